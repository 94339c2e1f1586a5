"""What a measured tier costs per token, and the monthly volume above which it is cheaper than a provider.

Pure arithmetic on a run's results and prices; no I/O. The local tier is a fixed cost (its hourly price, all
month long: a rented GPU is billed whether or not it generates), a provider a price per token. So:

- USD per 1M output tokens = hourly price / (output tok/s x 3600) x 1e6, at each measured level;
- a provider's price per 1M output tokens of the workload's mix = output price + (prompt tokens per output
  token) x input price: the provider also bills the prompts that the measured throughput already includes;
- break-even = the tier's monthly price / that price: above that many output tokens a month the tier is
  cheaper, provided it can generate them; `busy` is the share of the month it must generate at a level's
  throughput to do so (over 1: at that throughput it is never cheaper).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.config import Provider, Tier

HOURS_PER_MONTH = 730.0  # 365 x 24 / 12


@dataclass(frozen=True)
class Mix:
    """Tokens per request of the workload whose throughput was measured."""

    prompt_tokens: int
    output_tokens: int

    @property
    def input_per_output(self) -> float:
        return self.prompt_tokens / self.output_tokens if self.output_tokens else 0.0


@dataclass(frozen=True)
class ProviderPrice:
    name: str
    input_per_1m_usd: float
    output_per_1m_usd: float
    source: str = "models.yaml"

    def per_1m_output(self, mix: Mix) -> float:
        """USD a provider bills per 1M output tokens, with the prompt tokens that come with them."""
        return self.output_per_1m_usd + mix.input_per_output * self.input_per_1m_usd


def tier_price(tier: Tier, gpu_hourly_usd: float | None = None) -> tuple[float | None, str]:
    """The tier's price per hour and where it came from; None when nothing prices it.

    `gpu_hourly_usd` (the --gpu-hourly-usd flag) replaces the profile's price of a whole GPU; a CPU tier,
    which has no GPU share, is then charged the whole flag (the machine)."""
    gpus = tier.resources.gpus
    if gpu_hourly_usd is not None:
        if gpus > 0:
            return gpu_hourly_usd * gpus, f"--gpu-hourly-usd {gpu_hourly_usd:g} x resources.gpus {gpus:g}"
        return gpu_hourly_usd, f"--gpu-hourly-usd {gpu_hourly_usd:g} (a CPU tier: the whole machine)"
    if tier.cost_per_hour_usd is not None:
        return tier.cost_per_hour_usd, "the tier's cost_per_hour_usd"
    if tier.cost_per_gpu_hour_usd is not None:
        return (tier.cost_per_gpu_hour_usd * gpus,
                f"the tier's cost_per_gpu_hour_usd {tier.cost_per_gpu_hour_usd:g} x resources.gpus {gpus:g}")
    return None, "no price: the tier sets neither cost_per_hour_usd nor cost_per_gpu_hour_usd (pass --gpu-hourly-usd)"


def paid_providers(providers: Iterable[Provider]) -> list[ProviderPrice]:
    """The providers that bill per token: marked `paid`, or with a price set."""
    return [
        ProviderPrice(p.name, p.price_input_per_1m_usd, p.price_output_per_1m_usd)
        for p in providers
        if p.paid or p.price_input_per_1m_usd or p.price_output_per_1m_usd
    ]


def parse_price(text: str) -> ProviderPrice:
    """`NAME=INPUT/OUTPUT` (USD per 1M tokens), the --provider-price flag."""
    name, sep, prices = text.partition("=")
    inp, slash, out = prices.partition("/")
    try:
        if not (sep and slash and name.strip()):
            raise ValueError
        return ProviderPrice(name.strip(), float(inp), float(out), "--provider-price")
    except ValueError:
        raise ValueError(f"expected NAME=INPUT/OUTPUT in USD per 1M tokens, e.g. openai=2/8; got {text!r}") from None


def usd_per_1m_output(tok_per_s: float | None, hourly_usd: float) -> float | None:
    if not tok_per_s:
        return None
    return hourly_usd / (tok_per_s * 3600) * 1e6


def monthly_output_capacity(tok_per_s: float | None) -> float | None:
    """Output tokens a month at this throughput, generating without pause."""
    return tok_per_s * 3600 * HOURS_PER_MONTH if tok_per_s else None


def break_even_output_tokens(monthly_usd: float, provider_per_1m_output: float) -> float | None:
    """Output tokens a month above which the fixed monthly price beats the provider; None: the provider is free."""
    if provider_per_1m_output <= 0:
        return None
    return monthly_usd / provider_per_1m_output * 1e6


def busy_share(break_even: float | None, capacity: float | None) -> float | None:
    """Share of the month the tier must generate to reach break-even (over 1: it cannot)."""
    if break_even is None or not capacity:
        return None
    return break_even / capacity


def _r(x: float | None, nd: int) -> float | None:
    return None if x is None else round(x, nd)


def tier_report(
    tier: str,
    hourly_usd: float | None,
    source: str,
    results: Mapping[str, Mapping[str, Mapping[Any, Mapping[str, Any]]]],
    providers: list[ProviderPrice],
    mix: Mix,
) -> dict[str, Any]:
    """The cost block of one measured tier: per mode, system and level its USD per 1M output tokens, and per
    provider the break-even volume and the busy share each level would need. `results` is the run's
    [mode][system][concurrency] summaries."""
    out: dict[str, Any] = {
        "tier": tier,
        "hourly_usd": _r(hourly_usd, 6),
        "monthly_usd": _r(None if hourly_usd is None else hourly_usd * HOURS_PER_MONTH, 2),
        "hours_per_month": HOURS_PER_MONTH,
        "price_source": source,
        "mix": {"prompt_tokens": mix.prompt_tokens, "output_tokens": mix.output_tokens,
                "input_per_output": round(mix.input_per_output, 4)},
        "per_mode": {},
        "break_even": [],
    }
    if hourly_usd is None:
        return out
    monthly = hourly_usd * HOURS_PER_MONTH
    for mode, systems in results.items():
        for system, levels in systems.items():
            out["per_mode"].setdefault(mode, {})[system] = {
                c: {
                    "output_tok_per_s": r.get("output_tok_per_s"),
                    "usd_per_1m_output_tokens": _r(usd_per_1m_output(r.get("output_tok_per_s"), hourly_usd), 4),
                    "monthly_output_capacity": _r(monthly_output_capacity(r.get("output_tok_per_s")), 0),
                }
                for c, r in levels.items()
            }
    for p in providers:
        per_1m = p.per_1m_output(mix)
        even = break_even_output_tokens(monthly, per_1m)
        out["break_even"].append({
            "provider": p.name,
            "price_source": p.source,
            "price_input_per_1m_usd": p.input_per_1m_usd,
            "price_output_per_1m_usd": p.output_per_1m_usd,
            "usd_per_1m_output_tokens_with_mix": round(per_1m, 4),
            "output_tokens_per_month": _r(even, 0),
            "all_tokens_per_month": _r(None if even is None else even * (1 + mix.input_per_output), 0),
            "busy_share": {
                mode: {
                    system: {c: _r(busy_share(even, row["monthly_output_capacity"]), 4) for c, row in levels.items()}
                    for system, levels in systems.items()
                }
                for mode, systems in out["per_mode"].items()
            },
        })  # fmt: skip
    return out


def _money(x: float | None, nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _tokens(x: float | None) -> str:
    """Token counts as people read them: 1.23M, 45.6k, 2.1B."""
    if x is None:
        return "never"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    return f"**{100 * x:.0f} %**" if x > 1 else f"{100 * x:.1f} %"


def reference_system(report: Mapping[str, Any]) -> tuple[str, str] | None:
    """(mode, system) whose levels the break-even table shows: tierserve streaming when measured."""
    per_mode = report.get("per_mode") or {}
    for mode in ("stream", *per_mode):
        systems = per_mode.get(mode) or {}
        for system in ("tierserve", *systems):
            if system in systems:
                return mode, system
    return None


def markdown(report: Mapping[str, Any], caveat: str | None = None) -> list[str]:
    """The report's cost section (heading included) for one tier's block."""
    tier = report["tier"]
    lines = [f"## Cost per 1M output tokens, and break-even (tier `{tier}`)", ""]
    if report["hourly_usd"] is None:
        return [*lines, f"Not computed: {report['price_source']}.", ""]
    mix = report["mix"]
    lines += [
        f"At **${report['hourly_usd']:.4f}/hour** for tier `{tier}` ({report['price_source']}), "
        f"${report['monthly_usd']:.2f} a month ({report['hours_per_month']:g} h, billed whether it generates or "
        "not). USD per 1M output tokens = hourly price / (measured output tok/s x 3600) x 1e6, per level; "
        "each system serves the same model on the same engine settings, so they share the tier's price.",
        "",
    ]
    if caveat:
        lines += [caveat, ""]
    per_mode = report["per_mode"]
    for mode, systems in per_mode.items():
        names = list(systems)
        levels = sorted({c for lv in systems.values() for c in lv}, key=lambda c: int(c))
        lines += [
            f"{mode}: USD / 1M output tokens (output tok/s)",
            "",
            "| conc | " + " | ".join(names) + " |",
            "|---:|" + "---:|" * len(names),
        ]
        for c in levels:
            cells = []
            for n in names:
                row = systems[n].get(c)
                cells.append("-" if row is None else
                             f"{_money(row['usd_per_1m_output_tokens'])} ({_money(row['output_tok_per_s'], 1)})")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    ref = reference_system(report)
    lines += [
        f"Break-even against each paid provider, token mix {mix['prompt_tokens']} prompt tokens per "
        f"{mix['output_tokens']} output tokens (the workload's: {mix['input_per_output']:g} input tokens per output "
        "token), so a provider's price per 1M output tokens = output price + "
        f"{mix['input_per_output']:g} x input price. Above the break-even volume a month the tier is cheaper; "
        + (f"busy = the share of the month the tier must generate at {ref[1]}'s {ref[0]} throughput of that level "
           "to produce it (over 100 %: never cheaper at that throughput). " if ref else "")
        + "Input-heavier mixes (long agent contexts) raise the provider's price per output token and lower the "
        "tier's throughput: rerun with that --prompt-tokens/--output-tokens for their numbers.",
        "",
    ]
    if not report["break_even"]:
        return [*lines, "No paid provider is configured (models.yaml `providers` with `paid: true` or "
                "`price_*_per_1m_usd`), and no --provider-price given: no break-even rows.", ""]
    levels = sorted(report["per_mode"][ref[0]][ref[1]], key=lambda c: int(c)) if ref else []
    lines += [
        "| provider | USD / 1M in | USD / 1M out | USD / 1M out, with mix | break-even output tok/month "
        "| all tokens/month |" + "".join(f" busy c={c} |" for c in levels),
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(levels),
    ]
    for b in report["break_even"]:
        busy = b["busy_share"][ref[0]][ref[1]] if ref else {}
        lines.append(
            f"| {b['provider']} | {_money(b['price_input_per_1m_usd'], 2)} | {_money(b['price_output_per_1m_usd'], 2)} "
            f"| {_money(b['usd_per_1m_output_tokens_with_mix'], 3)} | {_tokens(b['output_tokens_per_month'])} "
            f"| {_tokens(b['all_tokens_per_month'])} |" + "".join(f" {_pct(busy.get(c))} |" for c in levels)
        )
    return [*lines, ""]


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A few lines for the console: the cheapest measured level, and each provider's break-even."""
    if report["hourly_usd"] is None:
        return [f"cost: tier {report['tier']}: {report['price_source']}"]
    out = [f"cost: tier {report['tier']} at ${report['hourly_usd']:.4f}/h (${report['monthly_usd']:.2f}/month)"]
    ref = reference_system(report)
    if ref:
        levels = report["per_mode"][ref[0]][ref[1]]
        priced = [(c, r) for c, r in levels.items() if r["usd_per_1m_output_tokens"] is not None]
        if priced:
            c, r = min(priced, key=lambda cr: cr[1]["usd_per_1m_output_tokens"])
            out.append(f"  {ref[1]} {ref[0]}: ${r['usd_per_1m_output_tokens']:.4f} per 1M output tokens at c={c} "
                       f"({r['output_tok_per_s']} tok/s)")
    for b in report["break_even"]:
        busy = b["busy_share"][ref[0]][ref[1]] if ref else {}
        best = min((v for v in busy.values() if v is not None), default=None)
        out.append(f"  vs {b['provider']}: cheaper above {_tokens(b['output_tokens_per_month'])} output tokens/month"
                   + (f" (busy {100 * best:.1f} % of the month at the best level)" if best is not None else ""))
    return out
