"""The agent-trace benchmark's pure parts: the trace, the hit rate from two /metrics texts, the ratios and targets,
the stickiness read from the extra turns, the markdown. No engine is started."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import agent_trace as at
from benchmarks.loadgen import PromptMaker, Sample


@pytest.fixture(scope="module")
def maker() -> PromptMaker:
    from serving.backends.tinymodel import cached_tiny_model
    from serving.config import Settings

    return PromptMaker(str(cached_tiny_model(Settings().cache_dir, 3)))


def _sizes(**kw: int) -> at.Sizes:
    base = {"sessions": 3, "turns": 4, "concurrency": 2, "tool_tokens": 40, "max_tokens": 16, "max_num_seqs": 8,
            "warmup": 0}  # fmt: skip
    return at.Sizes(**{**base, **kw})


# -- the trace -----------------------------------------------------------------------------------------


def test_trace_is_deterministic_for_a_seed(maker: PromptMaker) -> None:
    a, b = at.build_trace(maker, _sizes(), 7), at.build_trace(maker, _sizes(), 7)
    assert a == b
    other = at.build_trace(maker, _sizes(), 8)
    assert [x.tool_outputs for x in other.sessions] != [x.tool_outputs for x in a.sessions]


def test_sessions_share_system_prompt_and_tools_and_differ_in_their_task(maker: PromptMaker) -> None:
    trace = at.build_trace(maker, _sizes(sessions=5), 0)
    answers = ["ok"] * trace.turns
    convs = [trace.messages(s, answers, 2) for s in trace.sessions]
    assert all(c[0] == {"role": "system", "content": at.SYSTEM_PROMPT} for c in convs)
    assert len({c[1]["content"] for c in convs}) == 5  # each session's opening is its own: its own session
    assert trace.tools == at.TOOLS and {t["function"]["name"] for t in trace.tools} == {
        "read_file", "write_file", "run_tests"}  # fmt: skip
    json.dumps(trace.tools)  # plain JSON schemas, as sent


def test_prompts_grow_turn_by_turn_and_replay_the_answers(maker: PromptMaker) -> None:
    s = _sizes()
    trace = at.build_trace(maker, s, 0)
    count = at.TokenCounter(maker.tok)
    sess = trace.sessions[0]
    answers = [f"answer {i}" for i in range(s.turns)]
    sizes = [count(trace.messages(sess, answers, k), trace.tools) for k in range(s.turns + 1)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    msgs = trace.messages(sess, answers, 3)
    assert [m["role"] for m in msgs] == ["system", "user"] + ["assistant", "user"] * 3
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == answers[:3]
    # Each turn only appends: the previous turn's conversation is a prefix of the next (the cache's reuse).
    assert msgs[:6] == trace.messages(sess, answers, 2)
    assert msgs[3]["content"].startswith("<tool_response>") and msgs[3]["content"].endswith(at.NEXT_STEP)
    assert trace.messages(sess, answers, s.turns)[-1]["content"] == at.EXTRA_PROMPT
    with pytest.raises(ValueError):
        trace.messages(sess, answers[:1], 2)


def test_tool_outputs_have_about_m_tokens(maker: PromptMaker) -> None:
    out = at.tool_output(maker, 100, 0, 0, 0)
    n = len(maker.tok.encode(out, add_special_tokens=False))
    assert 100 <= n <= 150  # the body is 100 tokens; a header line, the tags and the question on top


@pytest.mark.parametrize("smoke", [True, False])
def test_default_sizes_keep_the_longest_prompt_under_the_budget(maker: PromptMaker, smoke: bool) -> None:
    s = at.sizes(at.parse_args(["--smoke"] if smoke else []))
    trace = at.build_trace(maker, s, 0)
    longest = at.longest_prompt(trace, at.TokenCounter(maker.tok), at.placeholder_answer(maker, s.max_tokens))
    assert longest <= at.PROMPT_BUDGET < at.MAX_MODEL_LEN - s.max_tokens
    assert (s.sessions, s.turns) == ((4, 3) if smoke else (16, 5))


def test_token_counter_without_tokenizer_estimates_from_characters() -> None:
    msgs = [{"role": "user", "content": "x" * 300}]
    assert 100 <= at.TokenCounter(None)(msgs, []) <= 120


def test_args_default_systems_and_validation() -> None:
    assert at.parse_args(["--smoke"]).systems == list(at.SMOKE_SYSTEMS)
    assert at.parse_args([]).systems == list(at.SYSTEMS)
    assert at.parse_args(["--systems", "tierserve-balance,vllm-1"]).systems == ["tierserve-balance", "vllm-1"]
    with pytest.raises(SystemExit):
        at.parse_args(["--systems", "vllm-2"])
    with pytest.raises(SystemExit):
        at.sizes(at.parse_args(["--sessions", "0"]))


# -- counters and the hit rate ---------------------------------------------------------------------------

BARE_BEFORE = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny-bench"} 100.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny-bench"} 0.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny-bench"} 100.0
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-bench"} 0.0
"""
BARE_AFTER = BARE_BEFORE.replace("} 100.0", "} 1100.0").replace('tiny-bench"} 0.0\n# HELP vllm:prompt',
                                                                 'tiny-bench"} 768.0\n# HELP vllm:prompt')


def _ingress(values: dict[str, tuple[float, float, float]], tier: str = "bench") -> str:
    """An ingress /metrics text: per replica (hits, queries, prompt tokens), plus another tier's counters."""
    lines = ["# HELP tierserve_queue_depth Waiting.", "# TYPE tierserve_queue_depth gauge",
             f'tierserve_queue_depth{{tier="{tier}"}} 0.0']  # fmt: skip
    for name, idx in ((at.HITS, 0), (at.QUERIES, 1), (at.PROMPT, 2)):
        family = name.removesuffix("_total")
        lines += [f"# HELP {family} x", f"# TYPE {family} counter"]
        for rep, v in values.items():
            lines.append(f'{name}{{engine="0",model_name="m",replica="{rep}",tier="{tier}"}} {v[idx]}')
        lines.append(f'{name}{{engine="0",model_name="m",replica="zz",tier="other"}} 999.0')
    return "\n".join(lines) + "\n"


def test_hit_rate_of_a_bare_vllm_from_two_scrapes() -> None:
    before, after = at.engine_counters(BARE_BEFORE, None), at.engine_counters(BARE_AFTER, None)
    assert before == {"": {at.HITS: 0.0, at.QUERIES: 100.0, at.PROMPT: 100.0}}
    hr = at.hit_rate(before, after)
    assert (hr["hits"], hr["queries"], hr["rate"], hr["prompt_tokens"]) == (768.0, 1000.0, 0.768, 1000.0)
    assert hr["missing"] == [] and hr["per_replica"][""]["prompt_share"] == 1.0


def test_hit_rate_sums_the_tiers_replicas_and_splits_prompt_tokens() -> None:
    before = at.engine_counters(_ingress({"r1": (0, 10, 10), "r2": (0, 10, 10)}), "bench")
    after = at.engine_counters(_ingress({"r1": (600, 810, 810), "r2": (100, 210, 210)}), "bench")
    assert set(before) == {"r1", "r2"}  # the other tier's replica is not counted
    hr = at.hit_rate(before, after)
    assert (hr["hits"], hr["queries"], hr["rate"]) == (700, 1000, 0.7)
    assert hr["per_replica"]["r1"] == {"prompt_tokens": 800, "prompt_share": 0.8, "hits": 600, "queries": 800,
                                       "rate": 0.75}  # fmt: skip
    assert hr["per_replica"]["r2"]["prompt_share"] == 0.2


def test_scrapes_that_each_show_one_replica_merge_into_one_reading() -> None:
    one = at.engine_counters(_ingress({"r1": (5, 10, 10)}), "bench")
    two = at.engine_counters(_ingress({"r2": (1, 20, 20)}), "bench")
    older = at.engine_counters(_ingress({"r1": (4, 8, 8)}), "bench")
    merged = at.merge_counters([one, two, older])
    assert merged == {"r1": {at.HITS: 5, at.QUERIES: 10, at.PROMPT: 10},
                      "r2": {at.HITS: 1, at.QUERIES: 20, at.PROMPT: 20}}


def test_hit_rate_without_queries_or_with_a_replica_read_once() -> None:
    before = at.engine_counters(_ingress({"r1": (0, 10, 10)}), "bench")
    after = at.engine_counters(_ingress({"r1": (0, 10, 10), "r2": (5, 5, 5)}), "bench")
    hr = at.hit_rate(before, after)
    assert hr["rate"] is None and hr["missing"] == ["r2"] and list(hr["per_replica"]) == ["r1"]
    assert at.hit_rate({}, {})["rate"] is None


# -- ratios, targets, stickiness, failures -------------------------------------------------------------


def _result(rate: float | None, p50: float | None, errors: int = 0, replicas: tuple[str, ...] = ("",)) -> dict:
    per = {r: {"prompt_tokens": 10, "prompt_share": 1 / len(replicas), "hits": 1, "queries": 10, "rate": 0.1}
           for r in replicas}  # fmt: skip
    turns = {"requests": 4, "ok": 4 - errors, "errors": errors, "error_kinds": {"boom": errors} if errors else {},
             "ttft_ms": {"p50": p50, "p95": p50, "mean": p50}, "e2e_ms": {"p50": p50, "p95": p50},
             "output_tok_per_s": 10.0}
    extra = {"requests": 2, "ok": 2, "errors": 0, "error_kinds": {}}
    return {"turns": turns, "ttft_ms": turns["ttft_ms"], "e2e_ms": turns["e2e_ms"], "extra": extra,
            "ttft_p50_by_turn_ms": [p50, None], "hit_rate": {"rate": rate, "per_replica": per, "missing": []},
            "sticky": {"sessions": 2, "named": 2 if len(replicas) > 1 else 0,
                       "sticky": 2 if len(replicas) > 1 else None, "per_replica": {r: 1 for r in replicas},
                       "replicas": {}, "trace_prompt_tokens": {r: 10 for r in replicas}}}  # fmt: skip


def test_ratios_and_targets_met_and_not_met() -> None:
    results = {"vllm-1": _result(0.8, 100.0), "tierserve-session": _result(0.76, 50.0, replicas=("a", "b")),
               "tierserve-balance": _result(0.4, 100.0, replicas=("a", "b"))}  # fmt: skip
    rat = at.ratios(results)
    assert rat["hit_rate_session_over_vllm1"] == 0.95 and rat["ttft_p50_session_over_balance"] == 0.5
    assert rat["hit_rate_balance_over_vllm1"] == 0.5 and rat["ttft_p50_balance_over_vllm1"] == 1.0
    assert [t["met"] for t in at.targets(rat)] == [True, True]
    assert rat["ttft_mean_session_over_balance"] == 0.5  # context, no target
    results["tierserve-session"] = _result(0.5, 80.0, replicas=("a", "b"))
    got = at.targets(at.ratios(results))
    assert [(t["value"], t["met"]) for t in got] == [(0.625, False), (0.8, False)]
    # A bound reached exactly counts as met, on either side.
    assert [t["met"] for t in at.targets({"hit_rate_session_over_vllm1": 0.9,
                                          "ttft_p50_session_over_balance": 0.6})] == [True, True]  # fmt: skip


def test_targets_not_measured_when_a_system_did_not_run() -> None:
    rat = at.ratios({"vllm-1": _result(0.8, 100.0), "tierserve-session": _result(0.8, 60.0, replicas=("a", "b"))})
    assert rat["ttft_p50_session_over_balance"] is None and rat["hit_rate_session_over_vllm1"] == 1.0
    assert [t["met"] for t in at.targets(rat)] == [True, None]
    assert at.ratios({"vllm-1": _result(0.0, 100.0), "tierserve-session": _result(0.5, 1.0)})[
        "hit_rate_session_over_vllm1"] is None  # a zero baseline: no ratio  # fmt: skip


def _turn(session: int, turn: int, replica: str | None, prompt: int = 0, error: str | None = None) -> at.Turn:
    s = Sample(start=0.0, end=0.1, ttft=0.05, output_tokens=1, prompt_tokens=prompt, error=error)
    if replica is not None:
        s.headers = {at.REPLICA_HEADER: replica}
    return at.Turn(session, turn, s)


def test_stickiness_from_the_extra_turns() -> None:
    extra = [_turn(0, 3, "a"), _turn(0, 4, "a"), _turn(1, 3, "b"), _turn(1, 4, "b"), _turn(2, 3, "a"),
             _turn(2, 4, "b")]  # fmt: skip
    st = at.stickiness(extra)
    assert (st["sessions"], st["named"], st["sticky"], st["per_replica"]) == (3, 3, 2, {"a": 1, "b": 1})
    turns = [_turn(0, 0, None, 100), _turn(0, 1, None, 200), _turn(1, 0, None, 50), _turn(2, 0, None, 7),
             _turn(1, 1, None, 999, error="boom")]  # fmt: skip
    # Session 2 moved between replicas: its tokens are nobody's; a failed turn's are not counted.
    assert at.prompt_tokens_by_replica(turns, st) == {"a": 300, "b": 50}
    bare = at.stickiness([_turn(0, 3, None), _turn(0, 4, None)])
    assert bare["sticky"] is None and bare["named"] == 0


def test_failures_name_errors_and_unread_counters() -> None:
    ok = {"vllm-1": _result(0.8, 100.0), "tierserve-session": _result(0.8, 60.0, replicas=("a", "b"))}
    assert at.failures(ok, {"vllm-1": 1, "tierserve-session": 2}) == []
    bad = {"vllm-1": _result(None, 100.0, errors=1), "tierserve-session": _result(0.8, 60.0, replicas=("a",))}
    got = at.failures(bad, {"vllm-1": 1, "tierserve-session": 2})
    assert any("vllm-1 turns: 1 x boom" in x for x in got)
    assert any("vllm-1: no prefix-cache queries" in x for x in got)
    assert any("tierserve-session: engine counters read for ['a'] of 2" in x for x in got)


# -- the document ----------------------------------------------------------------------------------------


def _doc(tmp_path: Path, results: dict[str, Any]) -> dict:
    import datetime as dt

    args = argparse.Namespace(machine="unit", smoke=True, served_name="tiny-bench", seed=0)
    raw = {n: [[0, 0, 0.0, 0.05, 0.1, 16, 700, None]] for n in results}
    s = _sizes(turns=2)
    return at.document(args, s, results, raw, {n: {"kind": "x"} for n in results}, {n: 1.0 for n in results},
                       ["litellm skipped: not installed in this environment"], dt.datetime.now().astimezone(),
                       {"cores": 2}, tmp_path, 900)  # fmt: skip


def test_markdown_names_the_targets_and_says_when_they_are_not_met(tmp_path: Path) -> None:
    results = {"vllm-1": _result(0.8, 100.0), "tierserve-session": _result(0.6, 90.0, replicas=("a", "b")),
               "tierserve-balance": _result(0.4, 100.0, replicas=("a", "b"))}  # fmt: skip
    doc = _doc(tmp_path, results)
    doc["meta"]["stop_problems"] = []
    md = at.markdown(doc)
    assert "## Targets (reported, not asserted)" in md
    assert "prefix-cache hit rate tierserve-session / vllm-1 = 0.750 (target >= 0.9): **NOT met**" in md
    assert "TTFT p50 tierserve-session / tierserve-balance = 0.900 (target <= 0.6): **NOT met**" in md
    assert "| tierserve-session | 4/4 |" in md and "| 2/2 |" in md  # sessions on one replica
    assert "litellm skipped" in md and "## TTFT p50 by turn (ms)" in md


def test_write_produces_json_md_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = {"vllm-1": _result(0.8, 100.0), "tierserve-session": _result(0.76, 50.0, replicas=("a", "b"))}
    doc = _doc(tmp_path, results)
    doc["meta"]["stop_problems"] = []
    paths = at.write(doc, tmp_path / "out")
    assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]
    back = json.loads((tmp_path / "out" / f"{doc['meta']['date']}-unit-agent-trace.json").read_text())
    assert back["failures"] == [] and back["raw"]["fields"] == list(at.ROW_FIELDS)
    assert back["raw"]["systems"][0][0] == "vllm-1" and back["targets"][0]["met"] is True
    assert "**met**" in paths[1].read_text()


def test_stats_of_the_turns() -> None:
    turns = [_turn(0, k, None, 100) for k in range(3)] + [_turn(1, 0, None, error="boom")]
    turns[0].sample.ttft, turns[1].sample.ttft, turns[2].sample.ttft = 0.01, 0.02, 0.06
    got = at.stats(turns, 2.0)
    assert (got["requests"], got["ok"], got["errors"], got["error_kinds"]) == (4, 3, 1, {"boom": 1})
    assert got["ttft_ms"] == {"p50": 20.0, "p95": 56.0, "mean": 30.0}
    assert got["output_tok_per_s"] == 1.5 and got["prompt_tokens_max"] == 100
    assert at.ttft_by_turn(turns, 2) == [10.0, 20.0]


def test_cpu_split_names_what_ran_outside_the_system() -> None:
    got = at.cpu_split(10.0, 15.0, {"engine": 8.0, "gateway": 3.0}, 1.0, 2)
    assert got == {"window_s": 10.0, "machine_busy_pct": 75.0, "engine_s": 8.0, "system_other_s": 3.0,
                   "load_generator_s": 1.0, "outside_s": 3.0, "outside_cores": 0.3}  # fmt: skip
    assert at.cpu_split(0.0, 0.0, {}, 0.0, 2)["machine_busy_pct"] is None
    assert at.cpu_split(1.0, 1.0, {"engine": 2.0}, 0.0, 2)["outside_s"] == 0.0  # readings race: never negative
