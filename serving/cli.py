"""`tierserve` commands: validate (and the GPU fit check), make-tiny-model, fetch-models, up, gpus, keys, inventory."""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from serving.config import AppConfig, AuthConfig, AuthSettings, ConfigError, Settings, load_config, validate_file

if TYPE_CHECKING:
    from serving.ops.fit import MetadataLookup, ModelMetadata
    from serving.security.keys import KeyStore

DEFAULT_DEPLOYMENT = "deployments/local.yaml"


def cmd_validate(args: argparse.Namespace) -> int:
    """The schema of the file and every profile; with --profile also whether that profile fits the GPUs
    (--gpu-memory/--gpus, else this machine's as NVML reads them)."""
    problems = validate_file(args.file)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if args.profile is None:
        if args.gpu_memory is not None or args.gpus is not None:
            print("error: --gpu-memory and --gpus need --profile NAME: the fit is checked per profile", file=sys.stderr)
            return 2
        print(f"{args.file}: ok")
        return 0
    from serving.ops import fit

    try:
        config = load_config(args.file, args.profile)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.gpu_memory is not None:
        hardware: fit.Hardware | str = fit.Hardware(args.gpu_memory, args.gpus or 1)
    else:
        hardware = fit.read_hardware()
        if isinstance(hardware, fit.Hardware) and args.gpus is not None:
            hardware = fit.Hardware(hardware.gpu_memory_bytes, args.gpus, hardware.name)
    if isinstance(hardware, str):
        print(f"{args.file}: ok (schema only)")
        print(f"no GPU memory fit check: no NVIDIA GPU could be read here ({hardware}); pass --gpu-memory SIZE "
              "(and --gpus N) to check profile " + args.profile + " for that hardware", file=sys.stderr)
        return 0
    report = fit.check_fit(config, hardware, fit_lookup(args.cache_dir))
    print(fit.render(report))
    if not report.ok:
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


def tiny_metadata(seed: int, cache_dir: Path | None = None) -> ModelMetadata:
    """The tiny model's metadata for the fit check: its generated directory when cached, else its recipe's
    shape (serving/backends/tinymodel.py; the trained vocabulary may come out a few tokens smaller)."""
    from serving.backends.tinymodel import GENERATOR_VERSION, MARKER, VOCAB_SIZE
    from serving.ops import fit

    if cache_dir is not None:
        generated = Path(cache_dir) / "models" / f"tiny-v{GENERATOR_VERSION}-seed{seed}"
        if (generated / MARKER).is_file():
            return fit.read_model_dir(generated)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 64, "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    return fit.ModelMetadata(config, fit.dense_tensors(config, "F32"), f"tiny model (seed {seed})")


def fit_lookup(cache_dir: str) -> MetadataLookup:
    from serving.ops import fit

    return fit.default_lookup(lambda seed: tiny_metadata(seed, Path(cache_dir)))


def fit_before_up(args: argparse.Namespace) -> bool:
    """`up`'s memory check: on a machine whose GPUs NVML reads, refuse a profile that won't fit them. A
    CPU-only machine skips it with a note."""
    from serving.ops import fit

    try:
        config = load_config(args.config, args.profile)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    hardware = fit.read_hardware()
    if isinstance(hardware, str):
        print(f"tierserve: GPU memory fit check skipped: no NVIDIA GPU readable ({hardware})", file=sys.stderr)
        return True
    report = fit.check_fit(config, hardware, fit_lookup(args.cache_dir))
    print(fit.render(report), flush=True)
    if report.ok:
        return True
    print(f"error: profile {args.profile} does not fit {hardware.describe()}; nothing started "
          "(--no-fit-check starts it anyway):", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    return False


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from serving.backends.tinymodel import make_tiny_model

    try:
        path = make_tiny_model(args.dir, args.seed, force=args.force, embedding=args.embedding)
    except FileExistsError as e:  # the directory holds a model of another seed or kind
        print(f"error: {e} (--force)", file=sys.stderr)
        return 1
    print(path)
    return 0


def fetch_models(args: argparse.Namespace) -> AppConfig | None:
    """Load the profile and prepare every tier's weights, printing where each is; None (after printing why) when
    the config or a download fails."""
    from serving.backends.weights import WeightsError, prefetch

    try:
        config = load_config(args.config, args.profile)
        paths = prefetch(config, Path(args.cache_dir))
    except (ConfigError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    for tier, path in paths.items():
        print(f"{tier}\t{path}")
    return config


def cmd_fetch_models(args: argparse.Namespace) -> int:
    return 0 if fetch_models(args) is not None else 1


def cmd_gpus(args: argparse.Namespace) -> int:
    """GPU readings as a table: every node of a running appliance (--url), or this machine's."""
    from serving.ops.gpu import GpuCollector, gpus_command

    if args.url:
        import httpx

        try:
            nodes = httpx.get(args.url.rstrip("/") + "/health/gpus", timeout=15).raise_for_status().json()["nodes"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            print(f"error: cannot read {args.url}/health/gpus: {exc}", file=sys.stderr)
            return 1
    else:
        collector = GpuCollector()
        nodes = [collector.snapshot().to_dict()]
        collector.close()
    print(gpus_command(nodes))
    return 0


def cmd_inventory(args: argparse.Namespace) -> int:
    """The Ansible inventory of a TFGrid deployment from `tofu output -json` (deployments/tfgrid)."""
    from serving.ops import inventory as inv

    try:
        doc = inv.inventory_from_tofu(inv.load_tofu_outputs(args.from_tofu), wireguard_subnet=args.wireguard_subnet,
                                      wireguard_over=args.wireguard_over)
    except (inv.InventoryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        agents = len(doc["all"]["children"]["agents"]["hosts"])
        print(f"{inv.write_inventory(doc, args.out)}: 1 GPU VM, {agents} agent VM(s)", file=sys.stderr)
    else:
        sys.stdout.write(inv.render_inventory(doc))
    return 0


def _keys_context(args: argparse.Namespace) -> tuple[KeyStore, AppConfig | None]:
    """The key store the server would use (--keys-file, TIERSERVE_KEYS_FILE, auth.keys_file, <state_dir>/keys.json)
    and the config, when it loads, to check tier names against."""
    from serving.security.keys import KeyStore, keys_file_path

    config = None
    if Path(args.config).exists():
        try:
            config = load_config(args.config, args.profile)
        except ConfigError as exc:
            print(f"warning: {exc}\n(tier names are not checked)", file=sys.stderr)
    path = Path(args.keys_file) if args.keys_file else keys_file_path(
        config.auth if config else AuthConfig(), Path(args.state_dir), AuthSettings()
    )
    return KeyStore(path), config


def _fmt_limit(value: object) -> str:
    return "-" if value is None else str(value)


def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list, show and revoke API keys; the plaintext of a key is printed once, by `create`."""
    import json
    from datetime import UTC, datetime

    from serving.security.keys import KeySpec, KeyStoreError, key_id_of

    store, config = _keys_context(args)
    try:
        if args.keys_command == "create":
            tiers = [t.strip() for t in args.tiers.split(",") if t.strip()] if args.tiers is not None else None
            fields = {"agent": args.agent, "tiers": tiers, "rpm": args.rpm, "tpm": args.tpm,
                      "budget_usd": args.budget_usd, "budget_period": args.budget_period,
                      "default_tier": args.default_tier, "priority": args.priority, "team": args.team,
                      "response_cache": args.response_cache}
            try:
                spec = KeySpec.model_validate(fields)
            except ValidationError as exc:
                problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
                raise KeyStoreError("; ".join(problems)) from None
            plaintext, record = store.create(spec, admin=args.admin, known_tiers=list(config.tiers) if config else None)
            print(plaintext)  # stdout holds only the key, for scripts; it is not stored anywhere
            print(f"created {'admin ' if record.admin else ''}key {record.id} for agent {record.agent} in "
                  f"{store.path}; this is the only time the key is shown", file=sys.stderr)
            return 0
        if args.keys_command == "revoke":
            changed = store.revoke(args.id, agent=args.agent)
            for r in changed:
                print(f"revoked {r.id} (agent {r.agent})")
            if not changed:
                print("already revoked", file=sys.stderr)
            return 0
        if args.keys_command == "show":
            found = store.get(key_id_of(args.id))
            if found is None:
                raise KeyStoreError(f"no key {args.id}")
            out = found.public()
            usage_path = Path(args.usage_db) if args.usage_db else None
            if usage_path is None:
                from serving.security.keys import usage_db_path

                usage_path = usage_db_path(config.auth if config else AuthConfig(), Path(args.state_dir))
            if usage_path.exists():
                from serving.security.quotas import Limiter
                from serving.spend.ledger import Budget

                ledger = Budget(usage_path)
                try:
                    usage = Limiter(ledger=ledger).usage(found)
                finally:
                    ledger.close()
                out.update({k: usage[k] for k in ("day", "month", "budget")})
            print(json.dumps(out, indent=2, default=str))
            return 0
        keys = store.list(include_revoked=args.all)
        if args.json:
            print(json.dumps([k.public() for k in keys], indent=2))
            return 0
        header = ("ID", "AGENT", "TEAM", "TIERS", "DEFAULT", "PRIORITY", "RPM", "TPM", "BUDGET", "CREATED", "REVOKED")
        rows: list[tuple[str, ...]] = [header]
        for k in keys:
            when = [datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M") if t else "-"
                    for t in (k.created_at, k.revoked_at)]
            budget = f"${k.budget_usd:g}/{k.budget_period}" if k.budget_usd is not None else "-"
            allowed = "ADMIN" if k.admin else ",".join(k.tiers) if k.tiers is not None else "all"
            rows.append((k.id, k.agent, _fmt_limit(k.team), allowed, _fmt_limit(k.default_tier), k.priority,
                         _fmt_limit(k.rpm), _fmt_limit(k.tpm), budget, *when))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return 0
    except KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def serve_config(deployment: Path, config: str, profile: str, cache_dir: str, host: str, port: int) -> dict:
    """The deployment file with this invocation's models.yaml, profile and bind address filled in."""
    doc = yaml.safe_load(deployment.read_text())
    doc.setdefault("http_options", {}).update({"host": host, "port": port})
    for app in doc.get("applications", []):
        if app.get("import_path") == "serving.app:build_app":
            app["args"] = {"config": str(Path(config).resolve()), "profile": profile, "cache_dir": cache_dir}
    return doc


def direct_ingress(config: AppConfig, env: dict[str, str], host: str, port: int) -> int:
    """The port Serve's HTTP proxy gets. One node and one ingress replica: the replica's own HTTP server takes
    the public port and the proxy an internal one, so a streamed chunk skips the proxy's Ray hop (measured:
    the gateway's CPU per streamed token halves, benchmarks/results/2026-11-23-vm-2cpu-gateway.md). Otherwise
    the proxy keeps the public port in front of every ingress replica."""
    if env.get("RAY_ADDRESS") or config.ingress.replicas != 1 or env.get("TIERSERVE_DIRECT_INGRESS") == "0":
        return port
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    # Serve allocates direct-ingress ports from [min, max): exactly the public port. No quarantine: that guards
    # HAProxy setups (not ours), and would keep a restarted ingress replica off its port for minutes.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
    env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)
    env["RAY_SERVE_PORT_QUARANTINE_S"] = "0"
    return unclaimed_port(host)


def unclaimed_port(host: str = "127.0.0.1") -> int:
    """A free TCP port below the kernel's ephemeral range. A port picked now and bound only later (a server
    that loads its engines first) must not be taken meanwhile by some other process's outgoing connection or
    port-0 listener, which is what the kernel hands out from that range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = range(20000, max(20001, low))  # above Ray's default worker ports (10002-19999)
    for port in random.sample(candidates, min(256, len(candidates))):
        if port_free(host, port):
            return port
    with _tcp_socket(host) as s:  # a crowded range: the kernel's choice after all
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tcp_socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def port_free(host: str, port: int) -> bool:
    """Whether a plain bind (no SO_REUSEADDR) of host:port succeeds now."""
    with _tcp_socket(host) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


PORT_WAIT_S = 120.0  # past Linux's 60 s TIME_WAIT and FIN_WAIT2 limits


def wait_port_free(host: str, port: int, timeout_s: float = PORT_WAIT_S, poll_s: float = 1.0,
                   sleep: Callable[[float], object] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait until the public port can be bound the way the direct-ingress replica binds it. Ray Serve 2.60
    binds it without SO_REUSEADDR, so the previous run's closing connections (FIN_WAIT/TIME_WAIT, up to
    60 s after a crash or restart) make that bind fail, and Ray then blocks the port for the rest of its
    life: with the range pinned to this one port the app would never get an ingress. Found by the Ansible
    run's kill-and-restart test."""
    deadline = clock() + timeout_s
    told = False
    while not port_free(host, port):
        if clock() >= deadline:
            return False
        if not told:
            print(f"tierserve: waiting for {host}:{port} to be free (the last run's connections are closing)",
                  file=sys.stderr, flush=True)
            told = True
        sleep(poll_s)
    return True


def ray_defaults(env: dict[str, str]) -> dict[str, str]:
    """Ray and Serve settings for `serve run`, each only where the operator hasn't set it."""
    if not env.get("RAY_ADDRESS"):
        # `serve run` starts a one-node Ray here: with Ray's "no cluster" mode its node address is loopback, so
        # GCS, raylet, object manager, dashboard and metrics agent listen on 127.0.0.1 only. (A cluster's nodes
        # are started by `ray start --node-ip-address` on the private network instead; see deployments/.)
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray Serve's throughput profile: user code and the handle router on the replica's own event loop (no
    # thread hop per streamed chunk), gRPC between deployments, direct ingress, GC frozen after start
    # (benchmarks/results/2026-11-23-vm-2cpu-gateway.md).
    env.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # Serve's controller reconciles every 0.1 s by default, which costs idle CPU on the core the HTTP path
    # needs (benchmarks/results/2026-11-30-vm-2cpu-ingress-profile.md). A replica's death or start is then
    # seen up to 0.4 s later; the router re-reads replica counts as soon as a tier call or a readiness probe
    # fails (serving/gateway/fleet.py, readiness.py), so requests don't wait on a dead one.
    env.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    return env


def serve_run_command(serve: Path, config_path: str, env: dict[str, str]) -> list[str]:
    """`serve run` of the config: on the cluster `RAY_ADDRESS` names, else on a Ray of its own. A bare
    `ray.init()` would join whatever cluster last wrote /tmp/ray/ray_current_cluster on this machine."""
    address = [] if env.get("RAY_ADDRESS") else ["--address", "local"]
    return [str(serve), "run", *address, config_path]


def cmd_up(args: argparse.Namespace) -> int:
    """Prepare the weights, then `serve run` the deployment; stop it with SIGINT, Ray's clean path."""
    from serving.security.redaction import auth_disabled_warning

    if not args.no_fit_check and not fit_before_up(args):
        return 1
    config = fetch_models(args)
    if config is None:
        return 1
    env = dict(os.environ)
    proxy_port = direct_ingress(config, env, args.host, args.port)
    if proxy_port != args.port and not wait_port_free(args.host, args.port):
        print(f"error: {args.host}:{args.port} is still in use after {PORT_WAIT_S:g} s (another process listens "
              "there?)",
              file=sys.stderr)
        return 1
    doc = serve_config(Path(args.deployment), args.config, args.profile, args.cache_dir, args.host, proxy_port)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tierserve-", delete=False) as fh:
        yaml.safe_dump(doc, fh)
    print(f"tierserve: serving profile {args.profile} on http://{args.host}:{args.port}/v1", flush=True)
    warning = auth_disabled_warning(config, args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    serve = Path(sys.executable).with_name("serve")
    ray_defaults(env)
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT: give the child
    # the default back, or the SIGINT we forward to stop it cleanly would be lost.
    proc = subprocess.Popen(
        serve_run_command(serve, fh.name, env),
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def forward(signum: int, _frame: object) -> None:
        # SIGTERM to `serve run` orphans vLLM engine processes; SIGINT shuts everything down cleanly.
        proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    finally:
        os.unlink(fh.name)
        _reap(proc.pid)
    return code


def _reap(pgid: int, grace_s: float = 10.0) -> None:
    """Anything left in serve run's process group after it exits is an orphan: end it."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.5)


def _memory_size(text: str) -> int:
    from serving.ops.fit import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def parser() -> argparse.ArgumentParser:
    from serving.security.keys import PRIORITY_VALUE

    settings = Settings()
    p = argparse.ArgumentParser(prog="tierserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a models.yaml and all its profiles; with --profile, its GPU memory fit")
    v.add_argument("file", nargs="?", default=str(settings.config))
    v.add_argument("--profile", help="also check that this profile's tiers fit the GPUs (memory plan per tier)")
    v.add_argument("--gpu-memory", type=_memory_size, metavar="SIZE",
                   help="memory of each GPU, e.g. 24GiB, 80GB, 81920MiB (default: read this machine's with NVML)")
    v.add_argument("--gpus", type=_positive_int, metavar="N",
                   help="GPUs per node (default: 1 with --gpu-memory, else as many as NVML sees)")
    v.add_argument("--cache-dir", default=str(settings.cache_dir), help="where generated tiny models are cached")
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("make-tiny-model", help="write the tiny random-weight test model")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="rewrite even if the directory holds a model")
    t.add_argument("--embedding", action="store_true",
                   help="write the tiny embedding model (served on /v1/embeddings) instead of the generative one")
    t.set_defaults(func=cmd_make_tiny_model)

    g = sub.add_parser("gpus", help="GPU utilisation, memory, temperature, power and tier processes")
    g.add_argument("--url", help="a running appliance, e.g. http://127.0.0.1:8000 (default: this machine)")
    g.set_defaults(func=cmd_gpus)

    i = sub.add_parser("inventory", help="Ansible inventory from deployments/tfgrid's `tofu output -json`")
    i.add_argument("--from-tofu", required=True, metavar="FILE", help="`tofu output -json` saved to a file, or -")
    i.add_argument("--out", metavar="PATH", help="write the inventory here (default: print it)")
    i.add_argument("--wireguard-subnet", default="10.66.0.0/24", help="tierserve's WireGuard overlay")
    i.add_argument("--wireguard-over", choices=["mycelium", "private"], default="mycelium",
                   help="the addresses WireGuard runs over: Mycelium, or the grid network's private ones")
    i.set_defaults(func=cmd_inventory)

    for name, func, text in (
        ("fetch-models", cmd_fetch_models, "download or generate every tier's weights"),
        ("up", cmd_up, "prepare weights and run the appliance (serve run)"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("--config", default=str(settings.config))
        s.add_argument("--profile", default=settings.profile)
        s.add_argument("--cache-dir", default=str(settings.cache_dir))
        if name == "up":
            s.add_argument("--deployment", default=DEFAULT_DEPLOYMENT)
            s.add_argument("--host", default=settings.host)
            s.add_argument("--port", type=int, default=settings.port)
            s.add_argument("--no-fit-check", action="store_true",
                           help="start even if the profile's tiers don't fit this machine's GPUs")
        s.set_defaults(func=func)

    k = sub.add_parser("keys", help="API keys per agent: create, list, show, revoke")
    k.add_argument(
        "--keys-file", help="key store (default: TIERSERVE_KEYS_FILE, else auth.keys_file, else <state_dir>/keys.json)"
    )
    k.add_argument("--config", default=str(settings.config), help="models.yaml: tier names and auth settings")
    k.add_argument("--profile", default=settings.profile)
    k.add_argument("--state-dir", default=str(settings.state_dir))
    k.set_defaults(func=cmd_keys)
    ks = k.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create a key and print it once")
    kc.add_argument("--agent", required=True, help="the agent's name (shown in usage and metrics)")
    kc.add_argument("--tiers", help="comma-separated tiers the key may use (default: all)")
    kc.add_argument("--rpm", type=int, help="requests per minute")
    kc.add_argument("--tpm", type=int, help="tokens (prompt + completion) per minute")
    kc.add_argument("--budget-usd", type=float, help="spend limit per --budget-period")
    kc.add_argument("--budget-period", choices=["day", "month"], default="month")
    kc.add_argument("--default-tier", help="the tier `model: auto` falls back to for this agent")
    kc.add_argument("--priority", choices=list(PRIORITY_VALUE), default="standard",
                    help="the key's place in the tiers' engine queues: interactive first, batch last")
    kc.add_argument("--team", help="the key's team: keys of one team share cached prompts and answers")
    kc.add_argument("--response-cache", action="store_true",
                    help="deterministic requests may be answered from the response cache (tiers that allow it)")
    kc.add_argument("--admin", action="store_true", help="an admin key (admin routes only, not /v1/*)")
    kl = ks.add_parser("list", help="list keys (never their secrets)")
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kl.add_argument("--json", action="store_true")
    kr = ks.add_parser("revoke", help="revoke a key by id, or every key of an agent")
    kr.add_argument("id", nargs="?")
    kr.add_argument("--agent")
    kv = ks.add_parser("show", help="one key's settings and usage")
    kv.add_argument("id")
    kv.add_argument("--usage-db", help="usage ledger (default: auth.usage_db, <state_dir>/usage.db)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parser().parse_args(argv)
        return args.func(args)
    except ValidationError as exc:
        if exc.title not in ("Settings", "AuthSettings"):
            raise
        # A bad TIERSERVE_* variable: name it, no traceback.
        for err in exc.errors():
            name = "TIERSERVE_" + "_".join(str(part) for part in err["loc"]).upper()
            print(f"error: environment variable {name}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
