"""A throwaway network of real Debian hosts on this machine, for running the playbook for real.

Topology (every address lives inside namespaces created here):

    <tag>-ctl  10.77.0.10  the Ansible controller (ansible-playbook runs inside this namespace)
    <tag>-gpu  10.77.0.1   booted systemd-nspawn container (Debian bookworm), the GPU node stand-in
    <tag>-agt  10.77.0.2   booted systemd-nspawn container, the agent VM
    <tag>-out  10.77.0.3   a plain namespace that is not a WireGuard peer
    <tag>-lan              a bridge joining the four (the "underlay": a cloud LAN or the internet)

Each namespace also has an address in Mycelium's range (5b2:77::<last octet>), which is what the inventory
generated from OpenTofu's outputs reaches a Grid VM by.

The containers boot systemd (PID 1 of this machine is not systemd, a booted container is) and run
sshd, so Ansible reaches them exactly as it reaches a VM. The kernel has no WireGuard module; the
containers get /dev/net/tun and wg-quick falls back to wireguard-go.

A container can see host directories read-only at the same path (`Lab.binds`): the GPU node gets the
Python that runs the tests, since the containers have no PyPI to install vLLM from.

The Debian root filesystem is built once with debootstrap and cached (TIERSERVE_TEST_CACHE, default
/var/cache/tierserve-test); each run boots copies of it and deletes them afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
# Everything the roles install must already be in the image: the containers have no route to a mirror.
PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-apt,openssh-server,iproute2,procps,ca-certificates,curl,"
    "python3-venv,python3-packaging,libnuma1,sudo,acl,wireguard-tools,wireguard-go,nftables,"
    # The monitoring role's packages (it installs them with apt, which finds them present: no mirror needed).
    "prometheus,prometheus-node-exporter"
)
CACHE = Path(os.environ.get("TIERSERVE_TEST_CACHE", "/var/cache/tierserve-test"))
UNDERLAY = "10.77.0"
HOSTS = {"gpu": f"{UNDERLAY}.1", "agt": f"{UNDERLAY}.2", "out": f"{UNDERLAY}.3", "ctl": f"{UNDERLAY}.10"}
# Each namespace's address in Mycelium's 400::/7 too, as a Grid VM has: the inventory generated from OpenTofu's
# outputs reaches the VMs (SSH, WireGuard) over these.
MYCELIUM = {name: f"5b2:77::{addr.rsplit('.', 1)[1]}" for name, addr in HOSTS.items()}
CONTAINERS = ("gpu", "agt")


def run(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, check=False, timeout=timeout, text=True, capture_output=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)!r} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def debian_mirror() -> str:
    """The mirror apt on this machine already uses for Debian's main archive."""
    if env := os.environ.get("TIERSERVE_TEST_MIRROR"):
        return env
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs + Suites + Components
            uris = re.search(r"(?mi)^URIs:\s*(\S+)", stanza)
            suites = re.search(r"(?mi)^Suites:(.*)$", stanza)
            if uris and suites and SUITE in suites.group(1).split() and "main" in stanza:
                return uris.group(1)
        for m in re.finditer(r"(?m)^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+.*\bmain\b", text):
            if m.group(2) == SUITE:
                return m.group(1)
    return "http://deb.debian.org/debian"


def rootfs() -> Path:
    """The cached container image; built with debootstrap on first use (about 90 s and 340 MB)."""
    key = hashlib.sha256(f"{SUITE} {PACKAGES}".encode()).hexdigest()[:12]
    target = CACHE / f"rootfs-{SUITE}-{key}"
    if (target / ".complete").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
    try:
        run(
            "debootstrap",
            "--variant=minbase",
            f"--include={PACKAGES}",
            SUITE,
            str(staging),
            debian_mirror(),
            timeout=1200,
        )
        # The image must not keep the build host's identity; each copy gets its own below.
        (staging / "etc/machine-id").write_text("")
        (staging / ".complete").write_text(PACKAGES + "\n")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class Lab:
    workdir: Path
    tag: str = field(default_factory=lambda: "ts" + secrets.token_hex(2))
    # The namespaces (name: underlay address; a name is at most 3 characters: it goes into veth names) and which
    # of them boot a container; `ctl` runs Ansible.
    hosts: dict[str, str] = field(default_factory=lambda: dict(HOSTS))
    containers: tuple[str, ...] = CONTAINERS
    # Host directories each container sees read-only at the same path (the GPU node gets the Python that runs
    # the tests: its interpreter, the project's venv and the editable source).
    binds: dict[str, list[Path]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def mycelium(self, name: str) -> str:
        return f"5b2:77::{self.hosts[name].rsplit('.', 1)[1]}"

    def nsexec(self, name: str, *cmd: str, check: bool = True, timeout: float = 120):
        return run("ip", "netns", "exec", self.ns(name), *cmd, check=check, timeout=timeout)

    # ---- setup -------------------------------------------------------------------------------
    def build_network(self) -> None:
        lan = self.ns("lan")
        for name in ("lan", *self.hosts):
            run("ip", "netns", "add", self.ns(name))
            self.namespaces.append(self.ns(name))
            run("ip", "-n", self.ns(name), "link", "set", "lo", "up")
        run("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", lan, "link", "set", "br0", "up")
        for name, addr in self.hosts.items():
            inner, outer = f"{self.tag}{name}0", f"{self.tag}{name}1"
            run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            run("ip", "link", "set", inner, "netns", self.ns(name))
            run("ip", "link", "set", outer, "netns", lan)
            run("ip", "-n", self.ns(name), "link", "set", inner, "name", "eth0")
            run("ip", "-n", self.ns(name), "addr", "add", f"{addr}/24", "dev", "eth0")
            run("ip", "-n", self.ns(name), "-6", "addr", "add", f"{self.mycelium(name)}/64", "dev", "eth0", "nodad")
            run("ip", "-n", self.ns(name), "link", "set", "eth0", "up")
            run("ip", "-n", lan, "link", "set", outer, "master", "br0")
            run("ip", "-n", lan, "link", "set", outer, "up")

    def prepare_container(self, name: str, image: Path) -> Path:
        root = self.workdir / name
        run("cp", "-a", "--reflink=auto", str(image), str(root), timeout=300)
        # The image was staged in a mkdtemp (0700): as the container's / that would lock out every non-root
        # user (the service user could not even reach its home or the journal's socket).
        root.chmod(0o755)
        (root / "etc/hostname").write_text(f"{name}\n")
        (root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
        ssh = root / "root/.ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (ssh / "authorized_keys").chmod(0o600)
        if any(Path("/root") in p.parents for p in self.binds.get(name, [])):
            # A bound interpreter under /root (pyenv) must be reachable by the service user.
            (root / "root").chmod(0o711)
        return root

    def boot(self, name: str, root: Path) -> None:
        log = open(self.workdir / f"{name}.console.log", "wb")
        env = dict(os.environ, SYSTEMD_NSPAWN_LOCK="0")
        self.procs[name] = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "-b",
                "--console=pipe",
                f"--network-namespace-path=/run/netns/{self.ns(name)}",
                "-D",
                str(root),
                f"--machine={self.ns(name)}",
                "--hostname",
                name,
                "--bind=/dev/net/tun",
                "--capability=CAP_NET_ADMIN",
                *(f"--bind-ro={path}" for path in self.binds.get(name, [])),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ssh(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"container {name} exited: {self.console(name)[-3000:]}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh(name, "true", check=False, timeout=30).returncode == 0:
                    return
            time.sleep(1)
        raise TimeoutError(f"no SSH on {name} after {timeout}s: {self.console(name)[-3000:]}")

    def start(self) -> None:
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        image = rootfs()
        self.build_network()
        for name in self.containers:
            self.boot(name, self.prepare_container(name, image))
        for name in self.containers:
            self.wait_ssh(name)

    # ---- use ---------------------------------------------------------------------------------
    def console(self, name: str) -> str:
        path = self.workdir / f"{name}.console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ssh(self, name: str, command: str, check: bool = True, timeout: float = 60):
        return self.nsexec(
            "ctl",
            "ssh",
            "-i",
            str(self.key),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "ConnectionAttempts=3",
            f"root@{self.hosts[name]}",
            command,
            check=check,
            timeout=timeout,
        )

    def open_ports(self, src: str, host: str, ports: list[int], timeout: float = 3.0) -> set[int]:
        """Which of `ports` on host accept a TCP connection from namespace `src` (tried all at once)."""
        probe = (
            "import json, socket, sys\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "def ok(port):\n"
            "    try:\n"
            f"        socket.create_connection(({host!r}, port), timeout={timeout}).close()\n"
            "        return port\n"
            "    except OSError:\n"
            "        return None\n"
            "ports = json.loads(sys.argv[1])\n"
            "with ThreadPoolExecutor(64) as pool:\n"
            "    print(json.dumps([p for p in pool.map(ok, ports) if p]))\n"
        )
        out = self.nsexec(src, sys.executable, "-c", probe, json.dumps(ports), timeout=timeout * 4 + 30)
        return set(json.loads(out.stdout))

    def tcp_open(self, src: str, host: str, port: int, timeout: float = 3.0) -> bool:
        """Whether a TCP connection from namespace `src` to host:port completes."""
        return port in self.open_ports(src, host, [port], timeout)

    # ---- teardown ----------------------------------------------------------------------------
    def stop(self, keep_logs: Path | None = None) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                # systemd-nspawn turns SIGTERM into an orderly poweroff of the container.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for name in self.containers:
            kill_rooted_in(self.workdir / name)
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for name in self.containers:
                with contextlib.suppress(FileNotFoundError):
                    shutil.copy(self.workdir / f"{name}.console.log", keep_logs / f"{name}.console.log")
        for name in reversed(self.namespaces):
            run("ip", "netns", "del", name, check=False)
        for name in self.containers:
            shutil.rmtree(self.workdir / name, ignore_errors=True)


def rooted_in(root: Path) -> list[int]:
    """PIDs of processes whose root directory is `root` (a container's, seen from the host)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "root") == str(root):
                    found.append(int(proc.name))
    return found


def kill_rooted_in(root: Path, timeout: float = 15) -> None:
    """A container's processes that outlived its nspawn (an engine that ignored the poweroff): SIGKILL, and
    wait until they are gone, so the next tests start on an empty machine."""
    deadline = time.monotonic() + timeout
    while (pids := rooted_in(root)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    if pids:
        raise RuntimeError(f"processes of {root} survive SIGKILL: {pids}")


def free_of_leftovers(tag: str) -> bool:
    """True when no namespace or veth of this lab is left on the machine."""
    netns = run("ip", "netns", "list", check=False).stdout
    links = run("ip", "-o", "link", "show", check=False).stdout
    return tag not in netns and tag not in links
