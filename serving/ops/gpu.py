"""GPU readings from NVML (nvidia-ml-py), as JSON, as Prometheus gauges and as a table.

One `GpuCollector` per node reads every GPU the node's driver sees and says which tier's processes hold
memory on each. It never raises: without a driver or NVML (CPU machines, CI) it reports
`tierserve_gpu_available 0` with empty readings and logs one warning, so /metrics and /health keep working.
A field the GPU does not support (power on some boards, per-process memory under MIG) becomes None and
its sample is left out rather than reported as 0.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

OTHER_TIER = "other"
# Enough to climb replica actor -> EngineCore -> worker (the process that actually holds GPU memory) with
# margin, and to stop on a cycle or a pid reused while we walk.
MAX_PARENT_DEPTH = 16

T = TypeVar("T")

TierLookup = Mapping[int, str] | Callable[[int], str | None]
ParentOf = Callable[[int], int | None]


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    tier: str
    used_memory_bytes: int | None  # None: NVML can't attribute memory (MIG, some vGPU / WSL drivers)


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None
    processes: tuple[GpuProcess, ...] = ()

    def tier_memory_bytes(self) -> dict[str, int]:
        """Memory per tier. Several processes of one tier share a GPU (EngineCore, workers): summed, since
        one label set may appear only once in an exposition."""
        out: dict[str, int] = {}
        for proc in self.processes:
            if proc.used_memory_bytes is not None:
                out[proc.tier] = out.get(proc.tier, 0) + proc.used_memory_bytes
        return out


@dataclass(frozen=True)
class GpuSnapshot:
    node: str
    available: bool
    gpus: tuple[GpuReading, ...] = ()
    error: str | None = None  # why `available` is False, for /health/gpus and the CLI

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # tuples become lists; every leaf is a JSON scalar

    def merge(self, other: GpuSnapshot) -> GpuSnapshot:
        """Two replicas' views of the same node: each knows only its own processes' tier, so per pid a
        named tier wins over `other`."""
        theirs = {g.uuid: {p.pid: p for p in g.processes} for g in other.gpus}
        gpus = []
        for gpu in self.gpus:
            procs = {p.pid: p for p in gpu.processes}
            for pid, proc in theirs.get(gpu.uuid, {}).items():
                if pid not in procs or procs[pid].tier == OTHER_TIER:
                    procs[pid] = proc
            gpus.append(replace(gpu, processes=tuple(procs[pid] for pid in sorted(procs))))
        return replace(self, gpus=tuple(gpus), available=self.available or other.available)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuSnapshot:
        gpus = tuple(
            GpuReading(
                **{k: v for k, v in g.items() if k != "processes"},
                processes=tuple(GpuProcess(**p) for p in g.get("processes", ())),
            )
            for g in data.get("gpus", ())
        )
        return cls(node=data["node"], available=bool(data["available"]), gpus=gpus, error=data.get("error"))


def parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc (Linux), or None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; ppid is the 2nd field after its ')'.
    try:
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return None


def tier_resolver(tier_of: TierLookup | None, parent_of: ParentOf | None = parent_pid) -> Callable[[int], str]:
    """pid -> tier name, `other` when unknown.

    The pids we know are Ray replica actors, but vLLM allocates GPU memory in child processes (EngineCore
    and its workers), so an unknown pid is looked up through its ancestors. NVML reports pids of the host's
    pid namespace; where this process runs in another one (a container) the walk finds nothing and the
    memory is labelled `other`, which is still truthful.
    """
    if tier_of is None:
        direct: Callable[[int], str | None] = lambda _pid: None  # noqa: E731
    elif isinstance(tier_of, Mapping):
        direct = tier_of.get
    else:
        direct = tier_of

    def resolve(pid: int) -> str:
        seen: set[int] = set()
        current: int | None = pid
        for _ in range(MAX_PARENT_DEPTH):
            if current is None or current <= 1 or current in seen:
                break
            seen.add(current)
            tier = direct(current)
            if tier:
                return tier
            if parent_of is None:
                break
            current = parent_of(current)
        return OTHER_TIER

    return resolve


class GpuCollector:
    """Reads this node's GPUs through NVML; a prometheus_client custom collector as well.

    `nvml` is the `pynvml` module by default; tests pass an object with the same functions returning
    recorded readings. NVML is initialised lazily on the first reading and only once: a machine without a
    driver doesn't get one while we run, so a failed init is remembered rather than retried on every scrape.
    """

    def __init__(
        self,
        nvml: Any = None,
        *,
        node: str | None = None,
        tier_of: TierLookup | None = None,
        parent_of: ParentOf | None = parent_pid,
    ) -> None:
        self._nvml = nvml
        self.node = node or socket.gethostname()
        self._tier = tier_resolver(tier_of, parent_of)
        self._lock = threading.Lock()
        self._initialised = False
        self._init_error: str | None = None
        self._warned: set[str] = set()

    # -- NVML lifecycle -------------------------------------------------------------------------------

    def _ensure_init(self) -> str | None:
        """None when NVML is usable, else why not. Logs the reason once per collector."""
        with self._lock:
            if self._initialised or self._init_error is not None:
                return self._init_error
            try:
                if self._nvml is None:
                    import pynvml

                    self._nvml = pynvml
                self._nvml.nvmlInit()
                self._initialised = True
            except ImportError:
                self._init_error = "NVML unavailable: the nvidia-ml-py package (pynvml) is not installed"
            # Broad on purpose: the contract is "never raise"; NVML failures arrive as NVMLError
            # subclasses (no driver: LibraryNotFound / DriverNotLoaded), a broken libnvidia-ml as OSError.
            except Exception as exc:
                self._init_error = f"NVML unavailable: {_describe(exc)}"
            if self._init_error is not None:
                log.warning(
                    "GPU telemetry off on node %s (%s); reporting tierserve_gpu_available 0",
                    self.node,
                    self._init_error,
                )
            return self._init_error

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                self._initialised = False
                _quiet(self._nvml.nvmlShutdown)

    # -- readings -------------------------------------------------------------------------------------

    def snapshot(self) -> GpuSnapshot:
        error = self._ensure_init()
        if error is not None:
            return GpuSnapshot(node=self.node, available=False, error=error)
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:  # driver gone mid-run (GPU fell off the bus): report, don't fail the scrape
            error = f"nvmlDeviceGetCount failed: {_describe(exc)}"
            self._warn_once(error)
            return GpuSnapshot(node=self.node, available=False, error=error)
        gpus = []
        for index in range(count):
            reading = self._read_gpu(index)
            if reading is not None:
                gpus.append(reading)
        return GpuSnapshot(
            node=self.node,
            available=count > 0,
            gpus=tuple(gpus),
            error=None if count > 0 else "no GPUs visible to NVML",
        )

    def _read_gpu(self, index: int) -> GpuReading | None:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except Exception as exc:
            # Without a handle or uuid there is no stable identity to label samples with: skip the GPU.
            self._warn_once(f"GPU {index} unreadable: {_describe(exc)}")
            return None
        util = _quiet(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        mem = _quiet(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temp = _quiet(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        power_mw = _quiet(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        return GpuReading(
            index=index,
            uuid=uuid,
            name=_text(_quiet(lambda: nvml.nvmlDeviceGetName(handle)) or ""),
            utilization_percent=None if util is None else float(util.gpu),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            temperature_celsius=None if temp is None else float(temp),
            power_watts=None if power_mw is None else power_mw / 1000.0,  # NVML reports milliwatts
            processes=self._read_processes(handle),
        )

    def _read_processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        # CUDA contexts are "compute" processes; a desktop or EGL context is "graphics". One process may be
        # in both lists with the same memory figure, so keep the first entry per pid.
        by_pid: dict[int, GpuProcess] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            fn: Callable[[Any], list[Any]] | None = getattr(self._nvml, getter, None)
            procs = _quiet(functools.partial(fn, handle)) if fn is not None else None
            for proc in procs or ():
                pid = int(proc.pid)
                if pid not in by_pid:
                    used = getattr(proc, "usedGpuMemory", None)  # pynvml maps "not available" to None
                    by_pid[pid] = GpuProcess(
                        pid=pid, tier=self._tier(pid), used_memory_bytes=None if used is None else int(used)
                    )
        return tuple(sorted(by_pid.values(), key=lambda p: p.pid))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("GPU telemetry on node %s: %s", self.node, message)

    # -- prometheus_client Collector protocol ---------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield from metric_families([self.snapshot()])

    def describe(self) -> Iterator[Metric]:
        # Lets CollectorRegistry.register check for name clashes without touching NVML.
        yield from metric_families([])


class SnapshotCollector:
    """Exports snapshots gathered elsewhere (e.g. from every node's collector) in one exposition."""

    def __init__(self, fetch: Callable[[], Iterable[GpuSnapshot | Mapping[str, Any]]]) -> None:
        self._fetch = fetch
        self._warned: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        try:
            snapshots = [_as_snapshot(s) for s in self._fetch()]
        except Exception as exc:  # a node that can't be reached must not fail the whole scrape
            message = _describe(exc)
            if message not in self._warned:  # once per distinct failure, not once per scrape
                self._warned.add(message)
                log.warning("GPU snapshots unavailable: %s", message)
            snapshots = []
        yield from metric_families(snapshots)

    def describe(self) -> Iterator[Metric]:
        yield from metric_families([])


_GPU_LABELS = ["gpu", "uuid", "node"]

# (metric name, help, GpuReading -> value or None)
_GPU_GAUGES: tuple[tuple[str, str, Callable[[GpuReading], float | None]], ...] = (
    (
        "tierserve_gpu_utilization_ratio",
        "Fraction of the last sample period the GPU was busy (0-1).",
        lambda r: None if r.utilization_percent is None else r.utilization_percent / 100.0,
    ),
    ("tierserve_gpu_memory_used_bytes", "GPU memory in use.", lambda r: r.memory_used_bytes),
    ("tierserve_gpu_memory_total_bytes", "GPU memory installed.", lambda r: r.memory_total_bytes),
    ("tierserve_gpu_temperature_celsius", "GPU core temperature.", lambda r: r.temperature_celsius),
    ("tierserve_gpu_power_watts", "GPU board power draw.", lambda r: r.power_watts),
)


def metric_families(snapshots: Iterable[GpuSnapshot]) -> list[GaugeMetricFamily]:
    """The GPU gauges for these snapshots. Every family is returned even when empty, so a CPU-only node
    still declares (HELP/TYPE) every metric the dashboard queries."""
    available = GaugeMetricFamily(
        "tierserve_gpu_available", "1 if NVML reports at least one GPU on the node, else 0.", labels=["node"]
    )
    gauges = [(GaugeMetricFamily(name, doc, labels=_GPU_LABELS), value) for name, doc, value in _GPU_GAUGES]
    proc_mem = GaugeMetricFamily(
        "tierserve_gpu_process_memory_bytes",
        "GPU memory held by a tier's processes (`other`: not a tierserve tier).",
        labels=[*_GPU_LABELS, "tier"],
    )
    for snap in snapshots:
        available.add_metric([snap.node], 1.0 if snap.available else 0.0)
        for gpu in snap.gpus:
            labels = [str(gpu.index), gpu.uuid, snap.node]
            for family, value in gauges:
                v = value(gpu)
                if v is not None:
                    family.add_metric(labels, float(v))
            for tier, used in sorted(gpu.tier_memory_bytes().items()):
                proc_mem.add_metric([*labels, tier], float(used))
    return [available, *(f for f, _ in gauges), proc_mem]


# -- table -------------------------------------------------------------------------------------------------


def render_table(snapshots: Sequence[GpuSnapshot | Mapping[str, Any]]) -> Table:
    table = Table(title="GPUs")
    for col in ("node", "gpu", "name", "util", "memory", "temp", "power", "tiers"):
        table.add_column(col, justify="left" if col in ("node", "name", "tiers") else "right")
    for snap in map(_as_snapshot, snapshots):
        if not snap.gpus:
            table.add_row(snap.node, "-", snap.error or "no GPUs", "", "", "", "", "")
        for gpu in snap.gpus:
            known = gpu.tier_memory_bytes()
            # A tier whose memory NVML can't attribute (MIG) is still shown as present on the GPU.
            present = sorted(known.keys() | {p.tier for p in gpu.processes})
            tiers = ", ".join(f"{t} {_gib(known.get(t))}" for t in present)
            table.add_row(
                snap.node,
                str(gpu.index),
                gpu.name,
                _fmt(gpu.utilization_percent, "{:.0f}%"),
                f"{_gib(gpu.memory_used_bytes)} / {_gib(gpu.memory_total_bytes)}",
                _fmt(gpu.temperature_celsius, "{:.0f} C"),
                _fmt(gpu.power_watts, "{:.0f} W"),
                tiers or "-",
            )
    return table


def gpus_command(snapshots: list[dict[str, Any]], width: int = 120) -> str:
    """The `tierserve gpus` output for snapshots as returned by GET /health/gpus, as plain text."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(render_table(snapshots))
    return buf.getvalue()


# -- helpers -----------------------------------------------------------------------------------------------


def _as_snapshot(s: GpuSnapshot | Mapping[str, Any]) -> GpuSnapshot:
    return s if isinstance(s, GpuSnapshot) else GpuSnapshot.from_dict(s)


def _quiet(fn: Callable[[], T]) -> T | None:
    """fn(), or None when NVML says the field is unsupported or the call fails."""
    try:
        return fn()
    except Exception:
        return None


def _text(value: str | bytes) -> str:
    # pynvml returns str in recent releases, bytes in older ones.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f} GiB"


def main() -> None:
    """Print this node's readings as JSON, a table and a Prometheus exposition (for recording real GPUs)."""
    from prometheus_client import CollectorRegistry, generate_latest

    logging.basicConfig(level=logging.INFO)
    collector = GpuCollector()
    try:
        snap = collector.snapshot()
        print(json.dumps(snap.to_dict(), indent=2))
        print(gpus_command([snap.to_dict()]))
        registry = CollectorRegistry()
        registry.register(collector)
        print(generate_latest(registry).decode())
    finally:
        collector.close()


if __name__ == "__main__":
    main()
