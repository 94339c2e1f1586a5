"""Summaries, ratios, cost, and the .json / .md / .png outputs of a run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks import cost
from benchmarks.loadgen import Sample

MODES = ("stream", "nonstream")


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default), None for no data."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def error_kinds(errors: Iterable[str | None]) -> dict[str, int]:
    """How many failures of each kind (an error's first 120 characters); None is not a failure."""
    kinds: dict[str, int] = {}
    for error in errors:
        if error:
            kinds[error[:120]] = kinds.get(error[:120], 0) + 1
    return kinds


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def outcomes(
    samples: list[Sample], problem: Callable[[Sample], str | None] = lambda s: s.error
) -> tuple[dict[str, Any], list[float]]:
    """Requests, failures (by `problem`) and TTFT p50/p95 (ms) of the successes, and those TTFTs (seconds), for
    a caller to add its own statistics."""
    ok = [s for s in samples if problem(s) is None]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    block = {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": error_kinds(problem(s) for s in samples),
        "no_content": len(ok) - len(ttft),  # answers of only special tokens: no text, so no TTFT
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p95": ms(pct(ttft, 95))},
    }
    return block, ttft


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    out_tokens = sum(s.output_tokens for s in ok)
    ttft = [s.ttft for s in ok if s.ttft is not None]
    tpot = [s.tpot for s in ok if s.tpot is not None]
    gaps = [s.max_gap for s in ok if s.max_gap is not None]
    e2e = [s.e2e for s in ok]
    errors = error_kinds(s.error for s in samples)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": errors,
        "wall_s": round(wall_s, 3),
        "req_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "output_tok_per_s": round(out_tokens / wall_s, 1) if wall_s > 0 else None,
        "output_tokens": out_tokens,
        "mean_output_tokens": round(out_tokens / len(ok), 2) if ok else None,
        "mean_prompt_tokens": (
            round(
                sum(s.prompt_tokens for s in ok if s.prompt_tokens) / max(1, sum(1 for s in ok if s.prompt_tokens)), 1
            )
            if ok
            else None
        ),
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p95": ms(pct(ttft, 95)), "p99": ms(pct(ttft, 99))},
        "itl_ms": {"p50": ms(pct(tpot, 50)), "p95": ms(pct(tpot, 95))},
        "max_chunk_gap_ms": {"p50": ms(pct(gaps, 50)), "p95": ms(pct(gaps, 95))},
        # streamed answers of only special tokens (empty text): successes without a TTFT
        "no_content": sum(1 for s in ok if s.ttft is None) if ttft else 0,
        "mean_chunks": round(sum(s.chunks for s in ok) / len(ok), 2) if ok and ttft else None,
        "e2e_ms": {"p50": ms(pct(e2e, 50)), "p95": ms(pct(e2e, 95)), "p99": ms(pct(e2e, 99))},
    }


RAW_FIELDS = ("start_s", "ttft_s", "e2e_s", "output_tokens", "prompt_tokens", "itl_s", "max_gap_s", "chunks", "error")


def compact(samples: list[dict]) -> list[list]:
    """Each request of a level as one row of RAW_FIELDS; start relative to the level's first request."""
    if not samples:
        return []
    t0 = min(s["start"] for s in samples)
    r = lambda x: None if x is None else round(x, 5)  # noqa: E731
    return [
        [r(s["start"] - t0), r(s["ttft"]), r(s["end"] - s["start"]), s["output_tokens"], s["prompt_tokens"],
         r(s["tpot"]), r(s["max_gap"]), s["chunks"], s["error"]]
        for s in samples
    ]  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


def _delta(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round(a - b, 2)


def ratios(results: dict, of: str = "tierserve", against: tuple[str, ...] = ("bare", "litellm")) -> dict:
    """results[mode][system][c] -> ratios[f"{of}/{other}"][mode][c]."""
    out: dict[str, Any] = {}
    for other in against:
        per_mode: dict[str, Any] = {}
        for mode, systems in results.items():
            if of not in systems or other not in systems:
                continue
            rows = {}
            for c, mine in systems[of].items():
                theirs = systems[other].get(c)
                if theirs is None:
                    continue
                rows[c] = {
                    "output_tok_per_s": _ratio(mine["output_tok_per_s"], theirs["output_tok_per_s"]),
                    "req_per_s": _ratio(mine["req_per_s"], theirs["req_per_s"]),
                    "ttft_p50": _ratio(mine["ttft_ms"]["p50"], theirs["ttft_ms"]["p50"]),
                    "ttft_p95": _ratio(mine["ttft_ms"]["p95"], theirs["ttft_ms"]["p95"]),
                    "ttft_p50_delta_ms": _delta(mine["ttft_ms"]["p50"], theirs["ttft_ms"]["p50"]),
                    "ttft_p95_delta_ms": _delta(mine["ttft_ms"]["p95"], theirs["ttft_ms"]["p95"]),
                    "e2e_p50": _ratio(mine["e2e_ms"]["p50"], theirs["e2e_ms"]["p50"]),
                    "e2e_p95": _ratio(mine["e2e_ms"]["p95"], theirs["e2e_ms"]["p95"]),
                }
            per_mode[mode] = rows
        if per_mode:
            out[f"{of}/{other}"] = per_mode
    return out


def cost_per_1m(tok_per_s: float | None, hourly_usd: float) -> float | None:
    if not tok_per_s:
        return None
    return round(hourly_usd / (tok_per_s * 3600) * 1e6, 4)


def cost_table(results: dict, hourly_usd: float) -> dict:
    """Per mode and system: the best measured throughput and its cost per 1M output tokens (and per level)."""
    out: dict[str, Any] = {}
    for mode, systems in results.items():
        for system, levels in systems.items():
            best_c, best = max(levels.items(), key=lambda kv: kv[1]["output_tok_per_s"] or 0)
            out.setdefault(mode, {})[system] = {
                "best_concurrency": best_c,
                "best_output_tok_per_s": best["output_tok_per_s"],
                "usd_per_1m_output_tokens": cost_per_1m(best["output_tok_per_s"], hourly_usd),
                "per_concurrency": {c: cost_per_1m(r["output_tok_per_s"], hourly_usd) for c, r in levels.items()},
            }
    return out


def targets(rat: dict) -> dict:
    """The issue's targets, checked on the measured ratios (reported, never asserted)."""
    out: dict[str, Any] = {}
    bare = rat.get("tierserve/bare", {})
    lite = rat.get("tierserve/litellm", {})
    for mode, rows in bare.items():
        out.setdefault(mode, {})["throughput>=0.95x_bare"] = {
            c: (r["output_tok_per_s"] is not None and r["output_tok_per_s"] >= 0.95) for c, r in rows.items()
        }
        if mode == "stream":
            out[mode]["ttft_p95<=bare+10ms"] = {
                c: (r["ttft_p95_delta_ms"] is not None and r["ttft_p95_delta_ms"] <= 10) for c, r in rows.items()
            }
    for mode, rows in rat.get("tierserve-shipped/bare", {}).items():
        out.setdefault(mode, {})["shipped_throughput>=0.9x_bare"] = {
            c: (r["output_tok_per_s"] is not None and r["output_tok_per_s"] >= 0.9) for c, r in rows.items() if c > 1
        }
        if mode == "stream":
            out[mode]["shipped_ttft_p50<=bare+10ms"] = {
                c: (r["ttft_p50_delta_ms"] is not None and r["ttft_p50_delta_ms"] <= 10) for c, r in rows.items()
                if c == 1
            }
    for mode, rows in lite.items():
        key = "ahead_of_litellm_throughput" + ("_and_ttft_p95" if mode == "stream" else "")
        out.setdefault(mode, {})[key] = {
            c: (
                r["output_tok_per_s"] is not None
                and r["output_tok_per_s"] > 1
                and (mode != "stream" or (r["ttft_p95"] is not None and r["ttft_p95"] < 1))
            )
            for c, r in rows.items()
        }
    return out


# -- files --------------------------------------------------------------------------------------------


def _conc_axis(ax: Any, levels: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrent requests")


def _panel(ax: Any, systems: dict, value: Any, ylabel: str, title: str) -> None:
    """One line per system of `value(level summary)` against concurrency."""
    for system, levels in systems.items():
        cs = sorted(levels)
        ax.plot(cs, [value(levels[c]) or 0 for c in cs], marker="o", label=system)
    _conc_axis(ax, sorted({c for lv in systems.values() for c in lv}))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()


def plots(results: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig: Any, suffix: str) -> None:
        fig.tight_layout()
        path = stem.with_name(stem.name + suffix)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (mode, systems) in zip(axes[0], results.items(), strict=False):
        _panel(ax, systems, lambda lv: lv["output_tok_per_s"], "output tokens/s", f"throughput ({mode})")
    save(fig, "-throughput.png")

    if "stream" in results:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, q in zip(axes, ("p50", "p95"), strict=True):
            _panel(ax, results["stream"], lambda lv, q=q: lv["ttft_ms"][q], f"TTFT {q} (ms)",
                   f"time to first token {q} (streaming)")
            ax.set_yscale("log")
        save(fig, "-ttft.png")
    return written


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(doc: dict, png: list[Path]) -> str:
    """The run's .md: its setup, a table per mode, then ratios, targets, cost, probes, idle CPU, plots, notes."""
    meta = doc["meta"]
    startup = [f"{n}: {_f(s)} s" for n, s in (meta.get("startup_s") or {}).items()]
    lines = [
        *_md_setup(meta),
        *(line for mode, systems in doc["results"].items() for line in _md_results(mode, systems)),
        *_md_ratios(doc["ratios"]),
        *_md_targets(doc.get("targets")),
        *(_md_tier_cost(doc["cost"]["tier"]) if doc["cost"].get("tier") else _md_cost(doc["cost"])),
        *_section("Routing and fallback overhead", [_probe_line(n, p) for n, p in doc["probes"].items()]),
        *_md_idle(doc.get("idle_cpu") or {}),
        *(_section("Plots", [f"![{p.stem}]({p.name})" for p in png]) if png else []),
        *_bullets("Start-up (until the first token)", startup),
        *_bullets("Notes", meta.get("notes")),
        *_bullets("Stop problems", meta.get("stop_problems")),
    ]
    return "\n".join(lines)


def _section(title: str, body: list[str]) -> list[str]:
    return [f"## {title}", "", *body, ""]


def _bullets(title: str, items: list[str] | None) -> list[str]:
    """A section listing `items`; nothing when there are none."""
    return _section(title, [f"- {item}" for item in items]) if items else []


_COLUMNS = (
    "Columns: req/s and output tok/s over the level's wall time; TTFT = first content token (streaming "
    "only); ITL = a request's (last token - first token) / (tokens - 1); max gap = the longest pause "
    "between streamed chunks of a request (p95 over requests); e2e = whole request. Times in ms. "
    '"empty": streamed answers whose forced tokens were all special tokens (the random-weight model '
    "repeats EOS under `ignore_eos`), so no text and no TTFT: successes, left out of the TTFT/ITL columns."
)


def _md_setup(meta: dict) -> list[str]:
    """Title, command, machine, workload and systems, any re-analysis and noise notes, the columns' key."""
    w = meta["workload"]
    lines = [
        f"# Benchmark {meta['date']} on {meta['machine']}",
        "",
        f"Run `{meta['command']}` ({meta['sweep']} sweep), {meta['started']} → {meta['finished']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["host"].items()) + ".",
        "",
        f"Workload: chat, prompts of {w['prompt_tokens']} tokens (the model's tokenizer; different random prompt "
        f"per request, same list for every system), {w['output_tokens']} output tokens forced "
        "(`min_tokens` + `ignore_eos`), temperature 0, closed loop at fixed concurrency, "
        f"{w['requests_rule']} requests per level after {w['warmup']} warm-up requests; levels interleave the "
        "systems (concurrency outer, system inner) so background load hits all of them alike.",
        "",
        "Systems: " + "; ".join(f"**{n}**: {d}" for n, d in meta["systems"].items()) + ".",
        "",
    ]
    if meta.get("reanalysed"):
        lines += [f"> **Re-analysed:** {meta['reanalysed']}.", ""]
    if meta.get("noise"):
        lines += [f"> **Noise:** {meta['noise']}", ""]
    return [*lines, _COLUMNS, ""]


def _md_results(mode: str, systems: dict) -> list[str]:
    """One mode's table: a row per level and system, levels ascending, systems in the run's order."""
    head = (
        "| system | conc | req/s | out tok/s | TTFT p50 | p95 | p99 | ITL p50 | p95 | max gap p95 "
        "| e2e p50 | p95 | p99 | errors |"
    )
    rows = []
    for c in sorted({c for lv in systems.values() for c in lv}):
        for system, levels in systems.items():
            r = levels.get(c)
            if r is not None:
                rows.append(_result_row(system, c, r))
    return _section(mode, [head, "|---|" + "---:|" * 13, *rows])


def _result_row(system: str, c: Any, r: dict) -> str:
    empty = f" ({n} empty)" if (n := r.get("no_content")) else ""
    return (
        f"| {system} | {c} | {_f(r['req_per_s'], 2)} | {_f(r['output_tok_per_s'])} | "
        f"{_f(r['ttft_ms']['p50'])} | {_f(r['ttft_ms']['p95'])} | {_f(r['ttft_ms']['p99'])} | "
        f"{_f(r['itl_ms']['p50'], 2)} | {_f(r['itl_ms']['p95'], 2)} | {_f(r['max_chunk_gap_ms']['p95'])} | "
        f"{_f(r['e2e_ms']['p50'])} | {_f(r['e2e_ms']['p95'])} | {_f(r['e2e_ms']['p99'])} | "
        f"{r['errors']}/{r['requests']}{empty} |"
    )


def _md_ratios(ratios: dict) -> list[str]:
    """A table per compared pair and mode; nothing when no pair was measured."""
    if not ratios:
        return []
    key = "Throughput ratio > 1 and TTFT ratio < 1 favour tierserve; Δ = tierserve - other, in ms."
    lines = _section("Ratios", [key])
    for name, per_mode in ratios.items():
        for mode, rows in per_mode.items():
            lines += [
                f"### {name}, {mode}",
                "",
                "| conc | out tok/s | req/s | TTFT p50 | TTFT p95 | Δ TTFT p50 | Δ TTFT p95 | e2e p50 | e2e p95 |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                *(_ratio_row(c, r) for c, r in rows.items()),
                "",
            ]
    return lines


def _ratio_row(c: Any, r: dict) -> str:
    return (
        f"| {c} | {_f(r['output_tok_per_s'], 3)} | {_f(r['req_per_s'], 3)} | {_f(r['ttft_p50'], 3)} | "
        f"{_f(r['ttft_p95'], 3)} | {_f(r['ttft_p50_delta_ms'])} | {_f(r['ttft_p95_delta_ms'])} | "
        f"{_f(r['e2e_p50'], 3)} | {_f(r['e2e_p95'], 3)} |"
    )


def _md_targets(targets: dict | None) -> list[str]:
    if not targets:
        return []
    checks = [
        f"- {mode}, {name}: " + ", ".join(f"c={c} {_f(ok)}" for c, ok in per_c.items())
        for mode, per_mode in targets.items()
        for name, per_c in per_mode.items()
    ]
    return _section("Targets (reported, not asserted)", checks)


def _md_cost(cost: dict) -> list[str]:
    """Each system's cost per 1M output tokens at its best throughput, then the hosted providers' prices."""
    rows = [
        f"| {mode} | {system} | {r['best_concurrency']} | {_f(r['best_output_tok_per_s'])} | "
        f"{_f(r['usd_per_1m_output_tokens'], 4)} |"
        for mode, systems in cost["per_mode"].items()
        for system, r in systems.items()
    ]
    if cost.get("hosted"):
        hosted = [
            "Hosted providers (models.yaml `providers`):",
            "",
            "| provider | USD / 1M output tokens | USD / 1M input tokens |",
            "|---|---:|---:|",
            *(f"| {name} | {_f(p['output'], 3)} | {_f(p['input'], 3)} |" for name, p in cost["hosted"].items()),
        ]
    else:
        hosted = ["Hosted providers: models.yaml lists none with prices yet, so no break-even row."]
    body = [
        f"At **${cost['gpu_hourly_usd']:.2f}/hour** for the machine ({cost['price_source']}), from the best "
        "measured throughput of each system. On this CPU machine with a tiny model this only shows the method "
        "and the relative cost of each gateway; run it on the GPU VM for real prices.",
        "",
        "| mode | system | best conc | out tok/s | USD / 1M output tokens |",
        "|---|---|---:|---:|---:|",
        *rows,
        "",
        *hosted,
    ]
    return _section("Cost per 1M output tokens", body)


def _md_tier_cost(tier: dict) -> list[str]:
    """The measured tier's cost per level and break-even (benchmarks/cost.py); older documents have only
    the machine-price table (_md_cost)."""
    return cost.markdown(tier, tier.get("caveat"))


def _probe_line(name: str, probe: dict) -> str:
    if not probe.get("available"):
        return f"- **{name}**: not available — {probe.get('reason', 'unknown')}"
    return (
        f"- **{name}**: {probe['description']}: Δ TTFT p50 {_f(probe['delta_ttft_p50_ms'])} ms, "
        f"Δ e2e p50 {_f(probe['delta_e2e_p50_ms'])} ms over {probe['pairs']} pairs "
        f"(errors {probe['errors']})."
    )


def _md_idle(idle: dict) -> list[str]:
    """The idle-CPU table; nothing when the run skipped that reading."""
    if not idle.get("systems"):
        return []
    body = [
        "What each server takes from the engines on its node while it waits: the gateway is everything but "
        "the vLLM engine processes (HTTP server, Ray's processes, background pollers).",
        "",
        "| system | gateway | engine |",
        "|---|---:|---:|",
        *(
            f"| {name} | {_f(parts['gateway_pct_core'], 2)} | {_f(parts['engine_pct_core'], 2)} |"
            for name, parts in idle["systems"].items()
        ),
    ]
    return _section(f"Idle CPU ({_f(idle['seconds'], 0)} s after the loads, nothing sent; percent of one core)", body)


def write(doc: dict, out_dir: Path, stem_name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    png = plots(doc["results"], stem) if doc["results"] else []
    doc["meta"]["plots"] = [p.name for p in png]
    json_path = stem.with_suffix(".json")
    # Readable summaries; the per-request rows (`raw`) compact, one level per line.
    body = json.dumps({k: v for k, v in doc.items() if k != "raw"}, indent=1, default=str)
    if "raw" in doc:
        levels = [
            f"[{json.dumps(mode)}, {json.dumps(system)}, {c}, {json.dumps(rows, separators=(',', ':'))}]"
            for mode, systems in doc["raw"]["levels"].items()
            for system, per_c in systems.items()
            for c, rows in per_c.items()
        ]
        raw = (
            f'{{"fields": {json.dumps(doc["raw"]["fields"])}, "levels_as": ["mode", "system", "concurrency", '
            f'"rows"], "levels": [\n' + ",\n".join(levels) + "\n]}"
        )
        body = body[: body.rstrip().rfind("}")].rstrip() + ',\n "raw": ' + raw + "\n}"
    json_path.write_text(body + "\n")
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(doc, png) + "\n")
    return [json_path, md_path, *png]
