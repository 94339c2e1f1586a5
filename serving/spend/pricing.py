"""What a request costs: a provider's per-token prices, or a local tier's time at its hourly price."""

from __future__ import annotations

from dataclasses import dataclass

from serving.config import Provider, Tier


@dataclass(frozen=True, slots=True)
class Spend:
    """What one finished request used, as charged to its key."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    gpu_seconds: float


def provider_cost(provider: Provider | None, prompt_tokens: int, completion_tokens: int) -> float:
    if provider is None:
        return 0.0
    p = provider
    return (prompt_tokens * p.price_input_per_1m_usd + completion_tokens * p.price_output_per_1m_usd) / 1e6


def tier_hourly_usd(tier: Tier) -> float:
    """The tier's price per replica-hour: `cost_per_hour_usd`, else its GPUs at `cost_per_gpu_hour_usd`."""
    if tier.cost_per_hour_usd is not None:
        return tier.cost_per_hour_usd
    if tier.cost_per_gpu_hour_usd is not None:
        return tier.cost_per_gpu_hour_usd * tier.resources.gpus
    return 0.0


def local_spend(tier: Tier, duration_s: float, prompt_tokens: int, completion_tokens: int) -> Spend:
    """A locally served request: GPU-seconds = its duration x the tier's GPUs (an upper bound, since concurrent
    requests share the engine's batch); cost = its duration at the tier's hourly price."""
    return Spend(prompt_tokens, completion_tokens, duration_s * tier_hourly_usd(tier) / 3600,
                 duration_s * tier.resources.gpus)
