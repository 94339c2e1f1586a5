"""`tierserve` commands: validate, make-tiny-model, fetch-models, up, gpus."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from serving.config import ConfigError, Settings, load_config, validate_file

DEFAULT_DEPLOYMENT = "deployments/local.yaml"


def cmd_validate(args: argparse.Namespace) -> int:
    problems = validate_file(args.file)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from serving.tinymodel import make_tiny_model

    path = make_tiny_model(args.dir, args.seed, force=args.force)
    print(path)
    return 0


def cmd_fetch_models(args: argparse.Namespace) -> int:
    from serving.weights import WeightsError, prefetch

    try:
        paths = prefetch(load_config(args.config, args.profile), Path(args.cache_dir))
    except (ConfigError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for tier, path in paths.items():
        print(f"{tier}\t{path}")
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    """GPU readings as a table: every node of a running appliance (--url), or this machine's."""
    from serving.gpu import GpuCollector, gpus_command

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


def serve_config(deployment: Path, config: str, profile: str, cache_dir: str, host: str, port: int) -> dict:
    """The deployment file with this invocation's models.yaml, profile and bind address filled in."""
    doc = yaml.safe_load(deployment.read_text())
    doc.setdefault("http_options", {}).update({"host": host, "port": port})
    for app in doc.get("applications", []):
        if app.get("import_path") == "serving.app:build_app":
            app["args"] = {"config": str(Path(config).resolve()), "profile": profile, "cache_dir": cache_dir}
    return doc


def cmd_up(args: argparse.Namespace) -> int:
    """Prepare the weights, then `serve run` the deployment; stop it with SIGINT, Ray's clean path."""
    code = cmd_fetch_models(args)
    if code:
        return code
    doc = serve_config(Path(args.deployment), args.config, args.profile, args.cache_dir, args.host, args.port)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tierserve-", delete=False) as fh:
        yaml.safe_dump(doc, fh)
    print(f"tierserve: serving profile {args.profile} on http://{args.host}:{args.port}/v1", flush=True)
    serve = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve), "run", fh.name], start_new_session=True)

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


def parser() -> argparse.ArgumentParser:
    settings = Settings()
    p = argparse.ArgumentParser(prog="tierserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a models.yaml and all its profiles")
    v.add_argument("file", nargs="?", default=str(settings.config))
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("make-tiny-model", help="write the tiny random-weight test model")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="rewrite even if the directory holds a model")
    t.set_defaults(func=cmd_make_tiny_model)

    g = sub.add_parser("gpus", help="GPU utilisation, memory, temperature, power and tier processes")
    g.add_argument("--url", help="a running appliance, e.g. http://127.0.0.1:8000 (default: this machine)")
    g.set_defaults(func=cmd_gpus)

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
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
