"""A thin closed-loop load generator on the async OpenAI client.

Each level sends `num_requests` chat requests to one OpenAI-compatible base URL with `concurrency`
workers, and records per request: start, first token (streaming), end, output tokens and the gaps between
streamed chunks. Every system gets the same prompts in the same order.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import httpx
from openai import AsyncOpenAI

# Words of the tiny model's training text: prompts made of them tokenize densely and predictably.
_WORDS = (
    "def class return import from async await yield lambda if else for while try except with as the a of to "
    "and in is that it was on are be this have or by one had not but what all plan analyze reason step "
    "because therefore result answer question code function test review deploy server model token request "
    "tier engine queue fast small large python rust json yaml"
).split()


@dataclass(slots=True)
class Sample:
    """One request's timeline (seconds, time.perf_counter) and outcome."""

    start: float
    end: float = 0.0
    ttft: float | None = None  # streaming only: first content token
    output_tokens: int = 0
    prompt_tokens: int | None = None
    tpot: float | None = None  # (last token - first token) / (output_tokens - 1): inter-token latency
    chunks: int = 0
    max_gap: float | None = None  # largest gap between streamed chunks
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("headers")
        return d


@dataclass(slots=True)
class Workload:
    prompt_tokens: int = 128
    output_tokens: int = 64
    seed: int = 0
    ignore_eos: bool = True  # vLLM sampling extras: every request generates exactly output_tokens

    def body_extras(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.ignore_eos:
            extra = {"min_tokens": self.output_tokens, "ignore_eos": True}
        return extra


class PromptMaker:
    """Prompts of exactly `n` tokens of a tokenizer (when one is given), else about n words."""

    def __init__(self, tokenizer_dir: str | None) -> None:
        self.tok = None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def make(self, n: int, count: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [self._one(n, rng) for _ in range(count)]

    def _one(self, n: int, rng: random.Random) -> str:
        words = [rng.choice(_WORDS) for _ in range(n * 2 + 8)]
        text = " ".join(words)
        if self.tok is None:
            return " ".join(words[:n])
        ids = self.tok.encode(text, add_special_tokens=False)[:n]
        # decode() is typed for batches too; one sequence of ids decodes to one string.
        out = cast(str, self.tok.decode(ids))
        # Decoding and re-encoding a cut can shift a boundary by a token; trim until it is exactly n.
        for _ in range(8):
            again = self.tok.encode(out, add_special_tokens=False)
            if len(again) <= n:
                break
            out = cast(str, self.tok.decode(again[: n - (len(again) - n)]))
        return out


def make_client(base_url: str, api_key: str, concurrency: int, timeout_s: float) -> AsyncOpenAI:
    http = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8),
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        trust_env=False,  # never send loopback traffic through an HTTP proxy from the environment
    )
    return AsyncOpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0, http_client=http)


async def one_request(
    client: AsyncOpenAI, model: str, prompt: str, work: Workload, stream: bool, want_headers: bool = False
) -> Sample:
    messages = [{"role": "user", "content": prompt}]
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": work.output_tokens,
        "temperature": 0.0,
        "seed": work.seed,
        "extra_body": work.body_extras(),
    }
    s = Sample(start=time.perf_counter())
    try:
        if not stream:
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
            resp = raw.parse()
            s.end = time.perf_counter()
            if want_headers:
                s.headers = {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith("x-")}
            if resp.usage:
                s.output_tokens = resp.usage.completion_tokens
                s.prompt_tokens = resp.usage.prompt_tokens
            return s
        kwargs["stream_options"] = {"include_usage": True}
        raw = await client.chat.completions.with_raw_response.create(stream=True, **kwargs)
        if want_headers:
            s.headers = {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith("x-")}
        stream_obj = raw.parse()
        last = None
        max_gap = 0.0
        content_chunks = 0
        usage = None
        async for chunk in stream_obj:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                content_chunks += 1
                if s.ttft is None:
                    s.ttft = now - s.start
                elif last is not None:
                    max_gap = max(max_gap, now - last)
                last = now
        s.end = time.perf_counter()
        s.chunks = content_chunks
        s.max_gap = max_gap if content_chunks > 1 else None
        if usage is not None:
            s.output_tokens = usage.completion_tokens
            s.prompt_tokens = usage.prompt_tokens
        else:  # a gateway that drops the usage chunk: vLLM sends one token per chunk unless coalesced
            s.output_tokens = content_chunks
        if s.ttft is not None and last is not None and s.output_tokens > 1:
            s.tpot = (last - s.start - s.ttft) / (s.output_tokens - 1)
        if s.ttft is None and s.output_tokens == 0:
            s.error = "stream ended without a token"
        # A random-weight model can generate only special tokens (EOS, ignored): a complete, successful
        # answer whose text is empty. It counts as a success without a TTFT (summary: `no_content`).
    except Exception as exc:  # every failure is data: counted as an error of this level
        s.end = time.perf_counter()
        s.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return s


async def run_level(
    base_url: str,
    model: str,
    prompts: list[str],
    work: Workload,
    stream: bool,
    concurrency: int,
    api_key: str = "",
    timeout_s: float = 300.0,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[Sample], float]:
    """Send every prompt with `concurrency` workers; returns the samples (prompt order) and the wall time."""
    client = make_client(base_url, api_key, concurrency, timeout_s)
    results: list[Sample | None] = [None] * len(prompts)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(prompts):
            i = next_index
            next_index += 1
            results[i] = await one_request(client, model, prompts[i], work, stream)
            if on_done:
                on_done()

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    finally:
        wall = time.perf_counter() - t0
        await client.close()
    return [r for r in results if r is not None], wall
