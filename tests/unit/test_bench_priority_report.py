"""The priority benchmark's pieces (benchmarks/priority.py) without an engine: its load, config and keys, the
summaries and the report, and the whole measurement against a fake tier that queues like vLLM."""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from benchmarks import priority, servers
from benchmarks.loadgen import Sample

# -- arguments and sizes ------------------------------------------------------------------------------


def test_the_load_defaults_to_three_batch_streams_per_slot_and_smoke_shrinks_it() -> None:
    full = priority.sizes(priority.parse_args([]))
    assert (full.max_num_seqs, full.batch_streams, full.interactive_requests, full.batch_tokens) == (4, 12, 20, 256)
    smoke = priority.sizes(priority.parse_args(["--smoke"]))
    assert (smoke.batch_streams, smoke.interactive_requests, smoke.batch_tokens) == (8, 4, 64)
    mine = priority.sizes(priority.parse_args(["--smoke", "--max-num-seqs", "2", "--interactive-requests", "7"]))
    assert (mine.batch_streams, mine.interactive_requests) == (4, 7)  # explicit flags beat --smoke's defaults


def test_a_load_that_cannot_queue_or_unknown_policies_are_refused() -> None:
    with pytest.raises(SystemExit, match="must exceed"):
        priority.sizes(priority.parse_args(["--max-num-seqs", "4", "--batch-streams", "4"]))
    with pytest.raises(SystemExit, match="max-model-len"):
        priority.sizes(priority.parse_args(["--batch-tokens", "600"]))
    for bad in ("lifo", "priority,priority", ""):
        with pytest.raises(SystemExit):
            priority.parse_args(["--policies", bad])
    assert priority.parse_args(["--policies", "fcfs, priority"]).policies == ["fcfs", "priority"]


# -- the tier and its keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", priority.POLICIES)
def test_each_policys_config_is_the_benchmark_tier_with_that_policy(policy: str) -> None:
    doc = priority.policy_config(Path("/models/tiny"), "tiny-bench", 512, 4, policy, 3)
    engine = doc["tiers"][servers.BENCH_TIER]["engine"]
    assert engine["scheduling_policy"] == {"fcfs": "fcfs"}.get(policy, "priority") and engine["max_num_seqs"] == 4
    slots = doc["tiers"][servers.BENCH_TIER].get("slots")
    assert slots == ({"batch_per_replica": 3} if policy == "slots" else None)
    assert list(doc["tiers"]) == [servers.BENCH_TIER] and "providers" not in doc  # nothing to fall back to
    assert doc.get("auth", {}).get("enabled", True)
    assert servers.validate_config(doc) == []


def test_the_setup_writes_the_config_and_creates_one_key_per_class(tmp_path: Path) -> None:
    args = priority.parse_args(["--workdir", str(tmp_path)])
    server, _note, keys = priority.policy_server("priority", tmp_path / "model", args, 4, tmp_path)
    assert server.name == "tierserve-priority" and server.log_path.parent == tmp_path / "priority"
    assert server.env["TIERSERVE_STATE_DIR"] == str(tmp_path / "priority" / "state")
    assert server.setup is not None
    server.setup(server)
    assert set(keys) == {"interactive", "batch"} and all(k.startswith("ts_") for k in keys.values())
    assert server.api_key == keys["interactive"]  # the readiness probe's key
    cfg = tmp_path / "priority" / "models.yaml"
    listed = subprocess.run(
        [servers.bin_of("tierserve"), "keys", "--config", str(cfg), "--profile", "bench", "list", "--json"],
        env=server.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert {k["agent"]: k["priority"] for k in json.loads(listed.stdout)} == {
        "bench-interactive": "interactive", "bench-batch": "batch",
    }  # fmt: skip


# -- the summaries ------------------------------------------------------------------------------------


def _sample(ttft: float | None, error: str | None = None, provider: str = "local") -> Sample:
    return Sample(start=0.0, end=1.0, ttft=ttft, output_tokens=16, error=error,
                  headers={"x-tierserve-provider": provider})  # fmt: skip


def test_ttft_stats_take_percentiles_of_the_successes_and_count_the_failures() -> None:
    samples = [_sample(i / 100) for i in range(1, 21)]
    samples += [_sample(None, "APITimeoutError: timed out"), _sample(0.5, provider="paid"), _sample(None)]
    stats = priority.ttft_stats(samples)
    assert (stats["requests"], stats["ok"], stats["errors"], stats["no_content"]) == (23, 21, 2, 1)
    assert stats["ttft_ms"] == {"p50": 105.0, "p95": 190.5, "max": 200.0}
    assert stats["error_kinds"] == {"APITimeoutError: timed out": 1, "answered by 'paid', not the tier": 1}
    assert priority.ttft_stats([])["ttft_ms"] == {"p50": None, "p95": None, "max": None}


def test_batch_tokens_are_counted_by_chunk_arrival_inside_the_window() -> None:
    done = priority.BatchStream(start=0, end=10, chunk_times=[1, 2, 3, 4, 5], completion_tokens=10)  # 2 a chunk
    cut = priority.BatchStream(start=4, end=6, chunk_times=[4.5, 5.5], cancelled=True)  # scaled by the mean: 2
    before = priority.BatchStream(start=0, end=1, chunk_times=[0.5, 0.8], completion_tokens=4)  # before the window
    failed = priority.BatchStream(start=2, end=3, error="HTTP 500")
    assert priority.tokens_in_window([done, cut, before, failed], 3, 6) == 3 * 2 + 2 * 2
    assert priority.tokens_in_window([cut], 0, 9) == 2  # no completed stream: one token a chunk
    stats = priority.batch_stats([done, cut, before, failed], 3, 6)
    assert (stats["streams_started"], stats["completed"], stats["cut_at_window_end"], stats["errors"]) == (4, 2, 1, 1)
    assert stats["output_tokens_in_window"] == 10 and stats["output_tok_per_s"] == pytest.approx(10 / 3, abs=0.1)
    assert stats["error_kinds"] == {"HTTP 500": 1}


METRICS = """\
# HELP tierserve_queue_depth Requests waiting in the tier's engines (vLLM's waiting count)
# TYPE tierserve_queue_depth gauge
tierserve_queue_depth{tier="bench"} 3.0
tierserve_queue_depth{tier="other"} 9.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m",replica="a",tier="bench"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m",replica="b",tier="bench"} 2.0
# HELP tierserve_batch_slots_waiting Requests of batch keys waiting in the gateway for a batch slot
# TYPE tierserve_batch_slots_waiting gauge
tierserve_batch_slots_waiting{tier="bench"} 7.0
"""


def test_the_queue_is_read_from_every_waiting_gauge_of_the_tier_only() -> None:
    assert priority.queue_reading(METRICS, "bench") == {
        "tierserve_queue_depth": 3.0, "vllm:num_requests_waiting": 4.0, "tierserve_batch_slots_waiting": 7.0}
    assert priority.queue_reading("", "bench") == dict.fromkeys(priority.QUEUE_METRICS, 0.0)


def test_waiting_is_observed_only_from_readings_inside_the_window() -> None:
    readings = [(0.0, 5.0), (1.0, 0.0), (2.0, 4.0), (3.0, 2.0), (9.0, 7.0)]
    w = priority.waiting_stats(readings, 1.0, 3.0, at_start=4.0)
    assert (w["readings"], w["max"], w["mean"], w["share_nonzero"], w["observed"]) == (3, 4.0, 2.0, 0.667, True)
    idle = priority.waiting_stats([(1.0, 0.0)], 1.0, 3.0, at_start=None)
    assert not idle["observed"] and idle["at_window_start"] is None


def _phase(p50: float | None, p95: float | None, errors: dict[str, int] | None = None) -> dict:
    return {"requests": 4, "ok": 4, "errors": sum((errors or {}).values()), "error_kinds": errors or {},
            "no_content": 0, "ttft_ms": {"p50": p50, "p95": p95, "max": p95}}  # fmt: skip


def _summary(policy: str, sat_p95: float, tok_s: float = 100.0, observed: bool = True,
             errors: dict[str, int] | None = None) -> dict:  # fmt: skip
    batch = {"output_tok_per_s": tok_s, "errors": 0, "error_kinds": {}}
    waiting = priority.waiting_stats([(0.0, 4.0 if observed else 0.0)], 0.0, 1.0, 4.0 if observed else None)
    return priority.policy_summary(_phase(10, 10), _phase(20, 20), _phase(sat_p95 / 2, sat_p95, errors), batch,
                                   waiting, policy)  # fmt: skip


def test_the_target_is_the_slots_runs_ratio_and_fcfs_is_the_baseline() -> None:
    sl, pr, fc = _summary("slots", 30), _summary("priority", 150), _summary("fcfs", 300, tok_s=110)
    assert sl["ratio_p95"] == 1.5 and sl["target_met"] is True
    assert pr["ratio_p95"] == 7.5 and pr["target_met"] is None  # reported, compared, not the target
    assert fc["ratio_p95"] == 15 and fc["target_met"] is None
    assert _summary("slots", 50)["target_met"] is False
    cmp = priority.comparison({"slots": sl, "priority": pr, "fcfs": fc})
    assert cmp["saturated_p95_fcfs_over_slots"] == 10 and cmp["ratio_p95_fcfs_over_slots"] == 10
    assert cmp["saturated_p95_fcfs_over_priority"] == 2 and cmp["ratio_p95_fcfs_over_priority"] == 2
    assert cmp["batch_tok_per_s_slots_over_fcfs"] == pytest.approx(0.909)
    assert priority.comparison({"slots": sl, "priority": pr}) == {}


def test_every_failed_request_and_an_unsaturated_tier_fail_the_run() -> None:
    assert priority.failures({"priority": _summary("priority", 30)}) == []
    bad = _summary("fcfs", 30, observed=False, errors={"HTTP 502": 2})
    bad["batch"]["error_kinds"] = {"ReadTimeout": 1}
    assert priority.failures({"fcfs": bad}) == [
        "fcfs saturated interactive: 2 x HTTP 502", "fcfs batch: 1 x ReadTimeout",
        "fcfs: no request was seen waiting in the engine: the tier was not saturated",
    ]  # fmt: skip


# -- the whole measurement against a fake tier ----------------------------------------------------------


class FakeTier:
    """An OpenAI-compatible server with vLLM's queueing: `seqs` slots, a waiting queue ordered by the key's
    priority then arrival (`priority`) or by arrival (`fcfs`), nothing preempted; /metrics shows the queue."""

    PRIORITY = {"Bearer ts_interactive": -10, "Bearer ts_batch": 10}

    def __init__(self, policy: str, seqs: int, token_delay_s: float) -> None:
        self.policy, self.seqs, self.token_delay_s = policy, seqs, token_delay_s
        self.running = 0
        self.queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self.arrivals = itertools.count()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeTier:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake tier did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def waiting(self) -> int:
        return sum(1 for _, _, f in self.queue if not f.done())

    async def admit(self, key: str) -> None:
        if self.running < self.seqs and not self.waiting():
            self.running += 1
            return
        rank = self.PRIORITY.get(key, 0) if priority.ENGINE_POLICY[self.policy] == "priority" else 0
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self.queue, (rank, next(self.arrivals), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot as it left: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self.queue:
            _, _, fut = heapq.heappop(self.queue)
            if not fut.done():
                fut.set_result(None)  # the slot goes straight to the next waiting request
                return
        self.running -= 1

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            key = request.headers.get("authorization", "")
            n = int(body["max_tokens"])

            async def events() -> AsyncIterator[bytes]:
                await self.admit(key)
                try:
                    for i in range(n):
                        await asyncio.sleep(self.token_delay_s)
                        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                 "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}  # fmt: skip
                        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                    usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
                    last = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                            "usage": usage}  # fmt: skip
                    yield b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"
                finally:
                    self.release()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"x-tierserve-provider": "local"})  # fmt: skip

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(f'tierserve_queue_depth{{tier="bench"}} {self.waiting()}\n')

        return app


def _measure(policy: str) -> tuple[dict, dict]:
    sizes = priority.Sizes(max_num_seqs=2, batch_streams=4, interactive_requests=3, batch_tokens=20,
                           interactive_tokens=4, prompt_tokens=8, warmup=1)  # fmt: skip
    with FakeTier(policy, sizes.max_num_seqs, token_delay_s=0.005) as tier:
        load = priority.Load(
            f"http://127.0.0.1:{tier.port}/v1", f"http://127.0.0.1:{tier.port}/metrics", "m",
            {"interactive": "ts_interactive", "batch": "ts_batch"}, sizes, ["warm"], ["a", "b", "c"],
            ["d", "e", "f"], ["p", "q", "r", "s"], timeout_s=30, saturation_timeout_s=10,
        )  # fmt: skip
        measured = asyncio.run(priority.measure(load, say=lambda _: None))
        deadline = time.monotonic() + 5
        while (tier.running or tier.waiting()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the cut batch streams' disconnects reach the server
        assert (tier.running, tier.waiting()) == (0, 0), "a batch stream outlived the measurement"
    return priority.summarize(measured, policy)


def test_both_policies_measure_end_to_end_and_the_report_is_written(tmp_path: Path) -> None:
    results, raw = {}, {}
    for policy in priority.POLICIES:
        results[policy], raw[policy] = _measure(policy)
    for policy, r in results.items():
        assert r["warmup"]["ok"] == 1 and r["idle"]["ok"] == 3 and r["saturated"]["ok"] == 3, (policy, r)
        assert r["saturated"]["ttft_ms"]["p95"] is not None and r["ratio_p95"] is not None
        assert r["waiting"]["observed"] and r["waiting"]["at_window_start"] >= 1, r["waiting"]
        assert r["batch"]["errors"] == 0 and r["batch"]["output_tokens_in_window"] > 0, r["batch"]
        assert r["batch"]["cut_at_window_end"] >= 1  # the load ran until the window closed
        assert len(raw[policy]["saturated"]) == 3
    assert priority.failures(results) == []

    args = argparse.Namespace(machine="unit test", smoke=True, served_name="m", policies=list(priority.POLICIES),
                              batch_slots=1)
    s = priority.Sizes(2, 4, 3, 20, 4, 8, 1)
    doc = priority.document(args, s, results, raw, {}, {"tierserve-priority": 1.0}, _now(), {"cores": 2},
                            Path("/m"))  # fmt: skip
    doc["meta"]["stop_problems"] = []
    json_path, md_path = priority.write(doc, tmp_path)
    assert json_path.name == f"{doc['meta']['date']}-unit-test-priority.json"
    back = json.loads(json_path.read_text())
    assert set(back["results"]) == {"slots", "priority", "fcfs"} and back["failures"] == []
    assert set(back["comparison"]) == {f"{k}_fcfs_over_{p}" for k in ("saturated_p95", "saturated_p50", "ratio_p95")
                                       for p in ("slots", "priority")} | {
        "batch_tok_per_s_slots_over_fcfs", "batch_tok_per_s_priority_over_fcfs"}  # fmt: skip
    assert back["target"]["policy"] == "slots" and back["target"]["ratio_p95_max"] == 2.0
    assert [p[:2] for p in back["raw"]["phases"]][:3] == [["slots", "idle"], ["slots", "saturated"],
                                                          ["slots", "waiting"]]  # fmt: skip
    md = md_path.read_text()
    assert md.startswith("# Priority classes benchmark") and "| slots |" in md and "| fcfs |" in md
    assert "`slots.batch_per_replica` 1" in md
    assert "## fcfs against the classed runs" in md and "## Target (reported, not asserted)" in md
    assert "## Failures" not in md


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now().astimezone()
