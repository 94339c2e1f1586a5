"""GPU collector: the no-NVML path with the real pynvml, and NVML readings -> snapshot -> Prometheus text."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.ops.gpu import (
    GpuCollector,
    GpuSnapshot,
    SnapshotCollector,
    gpus_command,
    parent_pid,
    render_table,
    tier_resolver,
)

GIB = 2**30


class NVMLError(Exception):
    pass


@dataclass
class RecordedGpu:
    """What NVML said about one GPU; None fields raise like an unsupported query does."""

    uuid: str
    name: str
    util: int | None
    used: int
    total: int
    temp: int | None
    power_mw: int | None
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, usedGpuMemory)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)


class RecordedNvml:
    """The slice of the pynvml module GpuCollector uses, answering from recorded readings."""

    NVML_TEMPERATURE_GPU = 0
    NVMLError = NVMLError

    def __init__(self, gpus: list[RecordedGpu], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> RecordedGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, h: RecordedGpu) -> bytes:
        return h.uuid.encode()  # older pynvml returns bytes: the collector must decode

    def nvmlDeviceGetName(self, h: RecordedGpu) -> str:
        return h.name

    def nvmlDeviceGetUtilizationRates(self, h: RecordedGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=_supported(h.util), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: RecordedGpu) -> SimpleNamespace:
        return SimpleNamespace(used=h.used, total=h.total, free=h.total - h.used)

    def nvmlDeviceGetTemperature(self, h: RecordedGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return _supported(h.temp)

    def nvmlDeviceGetPowerUsage(self, h: RecordedGpu) -> int:
        return _supported(h.power_mw)

    def nvmlDeviceGetComputeRunningProcesses(self, h: RecordedGpu) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: RecordedGpu) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h.graphics]


def _supported(value: int | None) -> int:
    if value is None:
        raise NVMLError("Not Supported")
    return value


def two_gpus() -> RecordedNvml:
    return RecordedNvml(
        [
            RecordedGpu(
                uuid="GPU-aaaa",
                name="NVIDIA H100 80GB HBM3",
                util=87,
                used=60 * GIB,
                total=80 * GIB,
                temp=71,
                power_mw=412_500,
                # 101: coder replica's EngineCore worker (a child of replica 100); 102 a second coder
                # worker; 201: reasoning replica; 999: someone else's job.
                compute=[(101, 30 * GIB), (102, 10 * GIB), (201, 15 * GIB), (999, 5 * GIB)],
                graphics=[(201, 15 * GIB)],  # same process in both lists: counted once
            ),
            # A board that can't report power or temperature, with a process NVML can't attribute memory to.
            RecordedGpu(
                uuid="GPU-bbbb",
                name="NVIDIA L4",
                util=0,
                used=1 * GIB,
                total=24 * GIB,
                temp=None,
                power_mw=None,
                compute=[(301, None)],
            ),
        ]
    )


TIERS = {100: "coder", 201: "reasoning", 300: "fast"}
PARENTS = {101: 100, 102: 101, 100: 50, 201: 50, 999: 1, 301: 300, 50: 1}


def collector(nvml: Any, **kwargs: Any) -> GpuCollector:
    kwargs.setdefault("tier_of", TIERS)
    kwargs.setdefault("parent_of", PARENTS.get)
    return GpuCollector(nvml, node="gpu-node-1", **kwargs)


def scrape(*collectors: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A fresh registry's exposition, parsed back: family name -> [(labels, value)]."""
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    text = generate_latest(registry).decode()
    return {
        f.name: sorted(((s.labels, s.value) for s in f.samples), key=lambda lv: sorted(lv[0].items()))
        for f in text_string_to_metric_families(text)
    }


ALL_FAMILIES = {
    "tierserve_gpu_available",
    "tierserve_gpu_utilization_ratio",
    "tierserve_gpu_memory_used_bytes",
    "tierserve_gpu_memory_total_bytes",
    "tierserve_gpu_temperature_celsius",
    "tierserve_gpu_power_watts",
    "tierserve_gpu_process_memory_bytes",
}


# -- no NVML -----------------------------------------------------------------------------------------------


def test_without_driver_real_pynvml_reports_unavailable_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:  # this test is about machines without a driver; on a GPU host the mapping tests cover the rest
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")

    c = GpuCollector(node="cpu-node")  # the real pynvml module, imported lazily
    with caplog.at_level(logging.WARNING, logger="serving.ops.gpu"):
        snap = c.snapshot()
        metrics = scrape(c)
        scrape(c)  # repeated scrapes: no more warnings, no exception
        c.close()

    assert snap.available is False and snap.gpus == () and snap.node == "cpu-node"
    assert snap.error and snap.error.startswith("NVML unavailable:")
    assert metrics["tierserve_gpu_available"] == [({"node": "cpu-node"}, 0.0)]
    # Every family is still declared, empty, so dashboards and the metric-name check see them.
    assert set(metrics) == ALL_FAMILIES
    assert all(not samples for name, samples in metrics.items() if name != "tierserve_gpu_available")
    warnings = [r for r in caplog.records if r.name == "serving.ops.gpu"]
    assert len(warnings) == 1 and "tierserve_gpu_available 0" in warnings[0].getMessage()


def test_failed_init_is_not_retried_per_scrape(caplog: pytest.LogCaptureFixture) -> None:
    nvml = RecordedNvml([], init_error=NVMLError("Driver Not Loaded"))
    c = collector(nvml)
    with caplog.at_level(logging.WARNING, logger="serving.ops.gpu"):
        for _ in range(3):
            assert scrape(c)["tierserve_gpu_available"] == [({"node": "gpu-node-1"}, 0.0)]
    assert nvml.init_calls == 1
    assert len(caplog.records) == 1 and "Driver Not Loaded" in caplog.records[0].getMessage()


def test_missing_pynvml_package_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.WARNING, logger="serving.ops.gpu"):
        snap = GpuCollector(node="n").snapshot()
    assert not snap.available and snap.error and "nvidia-ml-py" in snap.error
    assert len(caplog.records) == 1


def test_device_count_failure_mid_run_reports_unavailable() -> None:
    nvml = two_gpus()
    c = collector(nvml)
    assert c.snapshot().available

    def lost() -> int:
        raise NVMLError("GPU is lost")

    nvml.nvmlDeviceGetCount = lost  # type: ignore[method-assign]
    snap = c.snapshot()
    assert not snap.available and snap.error and "GPU is lost" in snap.error
    assert scrape(c)["tierserve_gpu_available"] == [({"node": "gpu-node-1"}, 0.0)]


# -- readings -> metrics -----------------------------------------------------------------------------------


def test_readings_map_to_exact_metrics() -> None:
    nvml = two_gpus()
    metrics = scrape(collector(nvml))

    a = {"gpu": "0", "uuid": "GPU-aaaa", "node": "gpu-node-1"}
    b = {"gpu": "1", "uuid": "GPU-bbbb", "node": "gpu-node-1"}
    assert metrics["tierserve_gpu_available"] == [({"node": "gpu-node-1"}, 1.0)]
    assert metrics["tierserve_gpu_utilization_ratio"] == [(a, 0.87), (b, 0.0)]
    assert metrics["tierserve_gpu_memory_used_bytes"] == [(a, 60 * GIB), (b, 1 * GIB)]
    assert metrics["tierserve_gpu_memory_total_bytes"] == [(a, 80 * GIB), (b, 24 * GIB)]
    # Unsupported readings are absent, not zero: a 0 W or 0 C line on a graph would be a lie.
    assert metrics["tierserve_gpu_temperature_celsius"] == [(a, 71.0)]
    assert metrics["tierserve_gpu_power_watts"] == [(a, 412.5)]
    assert metrics["tierserve_gpu_process_memory_bytes"] == [
        ({**a, "tier": "coder"}, 40 * GIB),  # two coder worker processes, summed into one series
        ({**a, "tier": "other"}, 5 * GIB),
        ({**a, "tier": "reasoning"}, 15 * GIB),
    ]


def test_snapshot_json_round_trip() -> None:
    snap = collector(two_gpus()).snapshot()
    data = json.loads(json.dumps(snap.to_dict()))
    assert data["node"] == "gpu-node-1" and data["available"] is True and data["error"] is None
    first = data["gpus"][0]
    assert {k: first[k] for k in ("index", "uuid", "name", "utilization_percent", "power_watts")} == {
        "index": 0,
        "uuid": "GPU-aaaa",
        "name": "NVIDIA H100 80GB HBM3",
        "utilization_percent": 87.0,
        "power_watts": 412.5,
    }
    assert first["processes"] == [
        {"pid": 101, "tier": "coder", "used_memory_bytes": 30 * GIB},
        {"pid": 102, "tier": "coder", "used_memory_bytes": 10 * GIB},
        {"pid": 201, "tier": "reasoning", "used_memory_bytes": 15 * GIB},
        {"pid": 999, "tier": "other", "used_memory_bytes": 5 * GIB},
    ]
    assert data["gpus"][1]["temperature_celsius"] is None
    assert data["gpus"][1]["processes"] == [{"pid": 301, "tier": "fast", "used_memory_bytes": None}]
    assert GpuSnapshot.from_dict(data) == snap


def test_snapshots_from_several_nodes_in_one_exposition(caplog: pytest.LogCaptureFixture) -> None:
    gpu_node = collector(two_gpus()).snapshot()
    cpu_node = GpuSnapshot(node="cpu-node", available=False, error="NVML unavailable: x")
    metrics = scrape(SnapshotCollector(lambda: [gpu_node.to_dict(), cpu_node]))
    assert metrics["tierserve_gpu_available"] == [({"node": "cpu-node"}, 0.0), ({"node": "gpu-node-1"}, 1.0)]
    assert len(metrics["tierserve_gpu_memory_used_bytes"]) == 2

    def unreachable() -> list[GpuSnapshot]:
        raise ConnectionError("node gone")

    broken = SnapshotCollector(unreachable)
    with caplog.at_level(logging.WARNING, logger="serving.ops.gpu"):
        assert scrape(broken)["tierserve_gpu_available"] == []
        scrape(broken)
    assert len(caplog.records) == 1 and "node gone" in caplog.records[0].getMessage()


def test_registering_does_not_touch_nvml_and_names_clash() -> None:
    nvml = two_gpus()
    c = collector(nvml)
    registry = CollectorRegistry()
    registry.register(c)
    assert nvml.init_calls == 0  # describe() declares names without reading GPUs
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(collector(two_gpus()))
    generate_latest(registry)
    c.close()
    assert nvml.init_calls == 1 and nvml.shutdown_calls == 1


# -- pid -> tier -------------------------------------------------------------------------------------------


def test_tier_resolver_walks_up_to_the_replica() -> None:
    resolve = tier_resolver(TIERS, PARENTS.get)
    assert resolve(100) == "coder"  # the replica itself
    assert resolve(102) == "coder"  # worker -> EngineCore -> replica
    assert resolve(999) == "other"  # reaches init without meeting a tier
    assert resolve(12345) == "other"  # unknown and parentless


def test_tier_resolver_accepts_a_function_and_survives_cycles() -> None:
    resolve = tier_resolver(lambda pid: "fast" if pid == 7 else None, {5: 6, 6: 5}.get)
    assert resolve(7) == "fast"
    assert resolve(5) == "other"
    assert tier_resolver(None)(101) == "other"
    assert tier_resolver(TIERS, parent_of=None)(101) == "other"  # no walking: only direct hits


def test_parent_pid_reads_proc() -> None:
    import os

    assert parent_pid(os.getpid()) == os.getppid()
    assert parent_pid(2**22 + 12345) is None  # beyond pid_max: never exists


# -- table -------------------------------------------------------------------------------------------------


def test_table_shows_gpus_tiers_and_nodes_without_gpus() -> None:
    snaps = [
        collector(two_gpus()).snapshot().to_dict(),
        GpuSnapshot(node="cpu-node", available=False, error="NVML unavailable: no driver").to_dict(),
    ]
    text = gpus_command(snaps, width=160)
    lines = text.splitlines()
    row_a = next(line for line in lines if "H100" in line)
    for cell in ("gpu-node-1", "87%", "60.0 GiB / 80.0 GiB", "71 C", "412 W", "coder 40.0 GiB",
                 "other 5.0 GiB", "reasoning 15.0 GiB"):  # fmt: skip
        assert cell in row_a, (cell, row_a)
    row_b = next(line for line in lines if "L4" in line)
    # Temperature and power unsupported; the fast tier is on the GPU but NVML can't say how much it holds.
    assert "0%" in row_b and row_b.count("n/a") == 3 and "fast n/a" in row_b
    assert any("cpu-node" in line and "NVML unavailable: no driver" in line for line in lines)
    assert render_table(snaps).row_count == 3
