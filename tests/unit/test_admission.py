"""What a finished request is charged to its key (pure parts of serving/admission.py)."""

from __future__ import annotations

import pytest

from serving.config import Tier
from serving.gateway.admission import local_spend, parse_json_object
from serving.wire.errors import APIError


def tier(**over: object) -> Tier:
    return Tier.model_validate({"served_name": "t", "model": {"tiny_seed": 1}, **over})


def test_local_request_cost_is_its_duration_at_the_tiers_hourly_price() -> None:
    gpu_tier = tier(resources={"gpus": 0.5}, cost_per_gpu_hour_usd=2.0)
    spend = local_spend(gpu_tier, 36.0, 10, 20)
    assert spend.gpu_seconds == pytest.approx(18.0)  # 36 s x 0.5 GPU
    assert spend.cost_usd == pytest.approx(0.01)  # 36 s of ($2/GPU-hour x 0.5 GPU)
    assert (spend.prompt_tokens, spend.completion_tokens) == (10, 20)
    # An explicit hourly price wins (a CPU tier has no GPUs to price).
    assert local_spend(tier(cost_per_hour_usd=3600.0), 0.5, 0, 0).cost_usd == pytest.approx(0.5)
    assert local_spend(tier(), 100.0, 1, 1).cost_usd == 0.0


@pytest.mark.parametrize(("raw", "words"), [(b"{", "not valid JSON"), (b"[]", "got list"), (b"\xff", "not valid JSON")])
def test_bodies_must_be_json_objects(raw: bytes, words: str) -> None:
    with pytest.raises(APIError) as err:
        parse_json_object(raw)
    assert err.value.status == 400 and words in err.value.message
