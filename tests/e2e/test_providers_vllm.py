"""The provider client against a real bare vLLM (the session's upstream) behind the fault proxy."""

from __future__ import annotations

import json
from pathlib import Path

from serving.backends.providers import Completed
from tests.support.faultproxy import FaultProxy
from tests.unit.test_providers import Harness, data_events, run


def test_provider_client_against_bare_vllm(tmp_path: Path, upstream) -> None:
    upstream.wait(420)
    with FaultProxy(("127.0.0.1", upstream.port)) as proxy:
        h = Harness(proxy, tmp_path, models={"coder": "up"}, timeout_total_s=30, timeout_read_s=30)
        answer, chunks = run(h.call(stream=True, max_tokens=8, min_tokens=8, temperature=0, seed=1))
        events = data_events(chunks)
        assert events[-1] == b"data: [DONE]" and h.spent()[3] == 8 and h.spent()[1] == 0
        answer, _ = run(Harness(proxy, tmp_path / "a", models={"coder": "up"}).call(stream=False, max_tokens=3))
        assert isinstance(answer, Completed) and json.loads(answer.body)["usage"]["completion_tokens"] == 3
        proxy.set("cut", after_chunks=3)
        h = Harness(proxy, tmp_path / "b", models={"coder": "up"}, timeout_total_s=30, timeout_read_s=30)
        _, chunks = run(h.call(stream=True, max_tokens=16, min_tokens=16))
        events = data_events(chunks)
        assert len(events) == 4 and json.loads(events[-1][6:])["error"]["code"] == "upstream_stream_error"
        assert h.breaker.errors == 1
        proxy.set("pass")
        answer, _ = run(h.call(stream=True, max_tokens=4000))  # past the 2048 window: vLLM's 400, unretried
        assert isinstance(answer, Completed) and answer.status == 400
