"""Where a request goes: pure, cheap code from (request facts, tier/provider states, config) to a Decision.

The Decision is an ordered list of candidates, local tier and/or providers; the caller tries them in order
(failing over only before the first byte reached the client) or, when there is none, answers the
Decision's 400/404/429/503 with Retry-After. Nothing here does I/O or keeps state between calls; the
regexes of the `auto` rules are compiled once, in `Router.__init__`.

Prompt size is an estimate: characters / `routing.chars_per_token` (4 suits English with a large BPE
vocabulary; smaller vocabularies need less) plus 4 tokens per chat message, unless the caller passes an
exact count. The engine's own check stays authoritative: a prompt the estimate let through still gets
the engine's 400 `context_length_exceeded`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from serving.config import ENDPOINTS, PROMPT_FIELD, AppConfig, AutoRule, Endpoint, Provider, RoutingConfig
from serving.wire.errors import APIError, retry_after
from serving.wire.items import ProviderState

TargetKind = Literal["tier", "provider"]
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of a chat template, per message

# Code-like content: a fence, or two different code markers within CODE_SCAN_CHARS of each end. Plain
# substring tests (~1-2 ns per character each), where a regex alternation costs ~30-100 ns per character.
_FENCE = "```"
_CODE_MARKERS = ("\ndef ", "\nclass ", "import ", "#include", "function ", "return ", "=>", ");", "{\n", "}\n", ";\n",
                 "()", "==", "\n    ")
CODE_SCAN_CHARS = 4096


# -- inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestFacts:
    model: str  # as sent: a tier, served name, alias, or `auto`
    endpoint: Endpoint = "chat"
    pinned: str | None = None  # value of the pin header (`x-tierserve-tier`)
    prompt_tokens: int = 0  # estimate_tokens() or an exact count
    max_tokens: int | None = None
    text: str = ""  # what `auto` rules read: the last user message (or prompt), at most scan_chars
    # The caller's API key: the tier `auto` falls back to, and the tiers `auto` may pick (None: all).
    default_tier: str | None = None
    allowed: frozenset[str] | None = None
    priority: str = "standard"  # the key's class (serving/security/keys.py): `batch` keeps off paid providers
    # The tier an earlier `auto` turn of this conversation went to: `auto` stays there (its prefix cache) unless
    # the prompt has outgrown it.
    session_tier: str | None = None


@dataclass(frozen=True, slots=True)
class TierState:
    """What the caller knows about a tier right now; unknown fields leave their limits untriggered."""

    healthy_replicas: int | None = None  # RUNNING replicas; None: unknown (assumed available)
    ongoing: int = 0  # requests in flight to the tier, all replicas
    engine_waiting: int | None = None  # vLLM's waiting requests, summed over replicas
    est_wait_s: float | None = None  # the caller's estimate of queueing delay
    cold: bool = False  # scaled to zero or warming up: no replica can answer yet
    ejected: str | None = None  # why the tier is out of routing (its replica died), until a probe passes


# -- output -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    kind: TargetKind
    name: str  # tier name or provider name
    tier: str  # the tier served: for a provider, the key of its `models` mapping
    reason: str
    max_wait_s: float | None = None  # a cold tier: give up waiting after this, then try the next candidate


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Literal["tier", "provider", "reject"]
    tier: str | None  # the tier the request is for (None when the model is unknown)
    reason: str  # short ASCII text, fit for the `x-tierserve-route-reason` header
    candidates: tuple[Candidate, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # ("tier:coder" | "provider:openai", why)
    status: int = 200  # on reject: 400, 404, 429 or 503
    retry_after_s: int | None = None  # on 429/503
    code: str | None = None
    param: str | None = None

    def error(self) -> APIError:
        """The client-facing error of a reject, with Retry-After when the condition is transient."""
        headers = retry_after(self.retry_after_s) if self.retry_after_s is not None else {}
        why = "; ".join(f"{who}: {what}" for who, what in self.skipped)
        message = self.reason + (f" ({why})" if why and why not in self.reason else "")
        return APIError(self.status, message, code=self.code, param=self.param, headers=headers)


# -- facts from a request ---------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts (chat, and the Responses API's input parts)
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2  # code often sits at the end of a long message: keep both ends
    return text[:half] + "\n" + text[-half:]


def _block_text(content: Any) -> tuple[str | None, int]:
    """Anthropic content: (the text of its text blocks, None when it has none; characters of all its prompt text,
    tool results' content included)."""
    if isinstance(content, str):
        return content, len(content)
    if not isinstance(content, list):
        return None, 0
    texts: list[str] = []
    chars = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
            chars += len(block["text"])
        elif block.get("type") == "tool_result":
            chars += len(_content_text(block.get("content")))
    return ("\n".join(texts) if texts else None), chars


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompt_facts(prompt: Any) -> tuple[str, int, int]:
    """A completion's prompt or an embeddings input: (its last text, characters of text, count of token ids)."""
    if isinstance(prompt, str):
        return prompt, len(prompt), 0
    if not isinstance(prompt, list) or not prompt:
        return "", 0, 0
    if _is_tokens(prompt):  # one prompt as token ids
        return "", 0, len(prompt)
    strings = [p for p in prompt if isinstance(p, str)]
    tokens = sum(len(p) for p in prompt if _is_tokens(p))
    return (strings[-1] if strings else ""), sum(map(len, strings)), tokens


# The output-token fields routing reads, first match wins.
_MAX_TOKENS_KEYS: Mapping[str, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completion": ("max_completion_tokens", "max_tokens"),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
}


def facts_from_body(
    endpoint: Endpoint,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    routing: RoutingConfig,
    prompt_tokens: int | None = None,
    *,
    default_tier: str | None = None,
    allowed: Iterable[str] | None = None,
    priority: str = "standard",
    session_tier: str | None = None,
) -> RequestFacts:
    """Extract routing facts from a parsed request body; tolerant of malformed fields (the tier validates)."""
    model = body.get("model")
    max_tokens = next((body[k] for k in _MAX_TOKENS_KEYS.get(endpoint, ()) if body.get(k) is not None), None)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        max_tokens = None
    chars = 0
    messages = 0  # turns a chat template wraps (MESSAGE_OVERHEAD_TOKENS each)
    exact = 0  # token ids: counted, not estimated
    text = ""
    if endpoint == "chat":
        msgs = body.get("messages")
        if isinstance(msgs, list):
            for m in msgs:
                if not isinstance(m, dict):
                    continue
                messages += 1
                content = _content_text(m.get("content"))
                chars += len(content)
                if m.get("role") == "user":
                    text = content
    elif endpoint == "responses":
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages += 1
            chars += len(instructions)
        items = body.get("input")
        if isinstance(items, str):
            messages += 1
            text, chars = items, chars + len(items)
        elif isinstance(items, list):
            for item in items:
                if not isinstance(item, dict):
                    continue
                messages += 1
                content = _content_text(item.get("content"))
                # A tool's output and a call's arguments are prompt text too.
                chars += len(content) + sum(len(_content_text(item.get(k))) for k in ("output", "arguments"))
                if item.get("role") == "user":
                    text = content
    elif endpoint in ("messages", "count_tokens"):
        chars = _block_text(body.get("system"))[1]
        if chars:
            messages += 1
        msgs = body.get("messages")
        if isinstance(msgs, list):
            for m in msgs:
                if not isinstance(m, dict):
                    continue
                messages += 1
                words, size = _block_text(m.get("content"))
                chars += size
                # A user turn of tool results only is what chat sends as role "tool": not the user's words.
                if m.get("role") == "user" and words is not None:
                    text = words
    else:  # completion, embeddings
        text, chars, exact = _prompt_facts(body.get("input" if endpoint == "embeddings" else "prompt"))
    if prompt_tokens is None:
        prompt_tokens = math.ceil(chars / routing.chars_per_token) + MESSAGE_OVERHEAD_TOKENS * messages + exact
    return RequestFacts(
        model=model if isinstance(model, str) else "",
        endpoint=endpoint,
        pinned=headers.get(routing.pin_header) or None,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        text=_clip(text, routing.scan_chars),
        default_tier=default_tier,
        allowed=frozenset(allowed) if allowed is not None else None,
        priority=priority,
        session_tier=session_tier,
    )


def looks_like_code(text: str) -> bool:
    text = _clip(text, CODE_SCAN_CHARS)
    if _FENCE in text:
        return True
    hits = 0
    for marker in _CODE_MARKERS:
        if marker in text:
            hits += 1
            if hits >= 2:
                return True
    return False


# -- the router -------------------------------------------------------------------------------------


def _has_word(text: str, word: str) -> bool:
    """`word` in `text` as a whole word (both lower case); substring search, then a boundary check."""
    start = text.find(word)
    while start >= 0:
        end = start + len(word)
        if (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return True
        start = text.find(word, start + 1)
    return False


class _Rule:
    __slots__ = ("code", "keywords", "min_tokens", "name", "regex", "tier")

    def __init__(self, rule: AutoRule, index: int) -> None:
        self.tier = rule.tier
        self.name = rule.name or f"rule{index}"
        self.keywords = tuple(k.lower() for k in rule.keywords if k) or None
        self.regex = re.compile(rule.regex, re.IGNORECASE) if rule.regex else None
        self.code = rule.code
        self.min_tokens = rule.min_prompt_tokens

    def match(self, facts: RequestFacts, lowered: str, is_code: list[bool | None]) -> str | None:
        if self.min_tokens is not None and facts.prompt_tokens < self.min_tokens:
            return None
        text_matchers = self.keywords is not None or self.regex is not None or self.code
        if not text_matchers:
            return f"{self.name}(size)"
        if self.keywords is not None and any(_has_word(lowered, k) for k in self.keywords):
            return f"{self.name}(keyword)"
        if self.regex is not None and self.regex.search(facts.text):
            return f"{self.name}(regex)"
        if self.code:
            if is_code[0] is None:  # shared across rules: scan the text at most once
                is_code[0] = looks_like_code(facts.text)
            if is_code[0]:
                return f"{self.name}(code)"
        return None


class Router:
    """Built once per config; `route` is then pure and allocation-light."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.routing = config.routing
        self.names = config.model_names()
        self.tiers = config.tiers
        routing = config.routing
        self.default_tier = routing.default_tier if routing.default_tier in config.tiers else next(iter(config.tiers))
        self.rules = [_Rule(rule, i) for i, rule in enumerate(routing.rules)]
        # Priority order once; ties keep the file's order (sorted is stable).
        self.providers: list[Provider] = sorted(config.providers, key=lambda p: p.priority)
        # Local tiers by window size: where an `auto` prompt too long for its tier goes next.
        self.by_context = sorted(config.tiers, key=lambda t: config.tiers[t].engine.max_model_len)
        # The tiers that serve each endpoint (an embedding tier serves only embeddings, the others the rest).
        self.serving: dict[str, tuple[str, ...]] = {
            e: tuple(t for t, tier in config.tiers.items() if e in tier.endpoints) for e in ENDPOINTS
        }

    # -- step 1: which tier ---------------------------------------------------------------------------

    def _requested(self, facts: RequestFacts) -> tuple[str | None, str, bool, Decision | None]:
        """(tier, reason, auto, reject)."""
        if facts.pinned:
            tier = self.names.get(facts.pinned)
            if tier is None:
                header = self.routing.pin_header
                msg = f"{header}: unknown tier '{facts.pinned}' (known: {', '.join(sorted(self.tiers))})"
                return None, "", False, Decision("reject", None, msg, status=400, param=header)
            return tier, f"pinned:{tier}", False, None
        if facts.model == "auto":
            allowed = facts.allowed
            serving = self.serving[facts.endpoint]
            kept = facts.session_tier
            if kept in serving and (allowed is None or kept in allowed):
                return kept, f"auto:session->{kept}", True, None  # a too-long prompt still moves on (route)
            is_code: list[bool | None] = [None]
            lowered = facts.text.lower() if self.rules else ""
            for rule in self.rules:
                if allowed is not None and rule.tier not in allowed:
                    continue  # `auto` never picks a tier the caller's key may not use
                if rule.tier not in serving:
                    continue  # nor one that does not serve the endpoint (embeddings vs generation)
                hit = rule.match(facts, lowered, is_code)
                if hit:
                    return rule.tier, f"auto:{hit}->{rule.tier}", True, None
            default = self._auto_default(facts)
            return default, f"auto:default->{default}", True, None
        tier = self.names.get(facts.model)
        if tier is None:
            known = ", ".join(sorted([*self.names, "auto"]))
            msg = f"The model `{facts.model}` does not exist. Known: {known}"
            reject = Decision("reject", None, msg, status=404, code="model_not_found", param="model")
            return None, "", False, reject
        return tier, f"model:{tier}", False, None

    def _auto_default(self, facts: RequestFacts) -> str:
        """The key's default tier, else the catalog's, else (the key may not use that) its first allowed tier;
        always one that serves the endpoint when there is one."""
        allowed = facts.allowed
        serving = self.serving[facts.endpoint] or tuple(self.tiers)
        for tier in (facts.default_tier, self.default_tier):
            if tier in serving and (allowed is None or tier in allowed):
                return tier
        return next((t for t in serving if allowed is None or t in allowed), serving[0])

    # -- step 2: where ------------------------------------------------------------------------------

    def route(
        self,
        facts: RequestFacts,
        tiers: Mapping[str, TierState] | None = None,
        providers: Mapping[str, ProviderState] | None = None,
    ) -> Decision:
        tier, reason, auto, reject = self._requested(facts)
        if reject is not None or tier is None:
            return reject or Decision("reject", None, "no tier", status=400)
        if tier not in self.serving[facts.endpoint]:
            task = self.tiers[tier].task
            serving = ", ".join(self.serving[facts.endpoint]) or "none"
            msg = (f"tier {tier} ({'an embedding' if task == 'embed' else 'a generating'} model) does not serve "
                   f"{facts.endpoint}; tiers that do: {serving}")
            return Decision("reject", tier, msg, status=400, code="unsupported_endpoint", param="model")
        tiers = tiers or {}
        providers = providers or {}
        need = facts.prompt_tokens + (facts.max_tokens or 1)
        skipped: list[tuple[str, str]] = []
        blockers: list[tuple[int, float | None]] = []  # (status, retry after) of every obstacle met

        # A prompt too long for the tier: for `auto`, the smallest other tier that fits.
        local: str | None = tier
        ctx = self.tiers[tier].engine.max_model_len
        if need > ctx:
            skipped.append((f"tier:{tier}", f"prompt ~{facts.prompt_tokens} tokens + output > max_model_len {ctx}"))
            blockers.append((400, None))
            fits = [t for t in self.by_context if t != tier and self.tiers[t].engine.max_model_len >= need
                    and t in self.serving[facts.endpoint]]
            local = fits[0] if auto and fits else None
            if local is not None:
                reason += f";too-long->{local}"
        served: str = local or tier  # providers are chosen for this tier's model mapping

        head: list[Candidate] = []
        tail: list[Candidate] = []
        use_providers = True
        if local is not None:
            policy = self.tiers[local].overflow
            state = tiers.get(local, TierState())
            problem = self._tier_problem(local, state)
            if problem is None:
                head.append(Candidate("tier", local, local, reason))
            elif problem[0] == "cold":
                wait = Candidate("tier", local, local, reason + ";cold-wait", policy.max_cold_wait_s)
                skipped.append((f"tier:{local}", problem[1]))
                blockers.append((503, float(self.routing.unavailable_retry_after_s)))
                if policy.cold_start == "wait":
                    head.append(wait)
                else:
                    tail.append(wait)  # providers first; the cold tier is still better than a reject
            else:
                kind, why, retry = problem
                skipped.append((f"tier:{local}", why))
                blockers.append((429 if kind == "saturated" else 503, retry))
                use_providers = policy.on_unavailable == "fallback"
                reason += f";tier {local} {why}" if kind == "ejected" else f";{kind}"

        middle: list[Candidate] = []
        if use_providers:
            for p in self.providers:
                why_not = self._provider_problem(p, served, facts, need, providers.get(p.name, ProviderState()))
                if why_not is None:
                    middle.append(Candidate("provider", p.name, served, f"{reason}->provider:{p.name}"))
                elif why_not[0]:
                    skipped.append((f"provider:{p.name}", why_not[0]))
                    if why_not[1] is not None:
                        blockers.append(why_not[1])

        candidates = tuple(head + middle + tail)
        if not candidates and not auto and local is None and all(status == 400 for status, _ in blockers):
            # Only the size *estimate* stood in the way of the named tier: its engine counts exactly and
            # answers 400 context_length_exceeded itself if the prompt really doesn't fit.
            candidates = (Candidate("tier", tier, tier, reason + ";engine-checks-length"),)
        if candidates:
            first = candidates[0]
            return Decision(first.kind, served, first.reason, candidates, tuple(skipped))
        return self._reject(facts, served, reason, skipped, blockers)

    def _tier_problem(self, name: str, s: TierState) -> tuple[str, str, float | None] | None:
        """(kind, why, retry after) when the tier can't take the request now; kind: cold|saturated|down|ejected."""
        policy = self.tiers[name].overflow
        routing = self.routing
        if s.ejected is not None:
            return "ejected", f"ejected ({s.ejected})", float(routing.unavailable_retry_after_s)
        if s.cold:
            return "cold", "scaled to zero / warming up", None
        if s.healthy_replicas == 0:
            return "down", "no healthy replica", float(routing.unavailable_retry_after_s)
        replicas = s.healthy_replicas or 1
        if policy.max_queue_per_replica is not None and s.ongoing >= policy.max_queue_per_replica * replicas:
            limit = policy.max_queue_per_replica * replicas
            return "saturated", f"queue full ({s.ongoing} ongoing >= {limit})", float(routing.retry_after_s)
        if policy.max_engine_waiting is not None and (s.engine_waiting or 0) > policy.max_engine_waiting:
            why = f"engine waiting {s.engine_waiting} > {policy.max_engine_waiting}"
            return "saturated", why, float(routing.retry_after_s)
        if policy.max_wait_s is not None and (s.est_wait_s or 0.0) > policy.max_wait_s:
            why = f"estimated wait {s.est_wait_s:.1f}s > {policy.max_wait_s:g}s"
            return "saturated", why, float(routing.retry_after_s)
        return None

    def _provider_problem(
        self, p: Provider, tier: str, facts: RequestFacts, need: int, s: ProviderState
    ) -> tuple[str, tuple[int, float | None] | None] | None:
        """None when usable; else (why or '' to stay silent, blocker for the reject status)."""
        if p.upstream_model(tier) is None:
            return "", None  # not a candidate for this tier at all: no noise in the reason
        if facts.endpoint not in p.endpoints:
            return f"does not speak {facts.endpoint}", None
        if not p.enabled:
            return "disabled", None
        if p.paid and not self.routing.allow_paid:
            return "paid use disabled (routing.allow_paid: false)", None
        if p.paid and facts.priority == "batch" and not self.routing.batch_spills_to_paid:
            # Not a blocker: a batch request that only a paid provider could take gets the tier's own status.
            return "paid provider: batch keys queue instead (routing.batch_spills_to_paid)", None
        if need > p.max_context:
            return f"prompt ~{facts.prompt_tokens} tokens + output > max_context {p.max_context}", (400, None)
        if s.over_budget:
            return s.over_budget, (429, s.budget_reset_in_s)
        if not s.available:
            return f"breaker open, retry in {s.retry_in_s:.0f}s", (503, max(s.retry_in_s, 1.0))
        return None

    def _reject(
        self,
        facts: RequestFacts,
        tier: str,
        reason: str,
        skipped: list[tuple[str, str]],
        blockers: list[tuple[int, float | None]],
    ) -> Decision:
        transient = [(status, retry) for status, retry in blockers if status in (429, 503)]
        if not transient:  # only size stood in the way: the same answer the engine would give
            param = PROMPT_FIELD[facts.endpoint]
            msg = f"prompt of about {facts.prompt_tokens} tokens does not fit tier {tier} or any provider"
            return Decision(
                "reject", tier, msg, skipped=tuple(skipped), status=400,
                code="context_length_exceeded", param=param,
            )
        # The first obstacle met decides the status (the local tier's, when it had one); Retry-After is
        # the soonest moment any obstacle may clear.
        status = transient[0][0]
        retries = [r for _, r in transient if r is not None]
        wait_s = max(1, math.ceil(min(retries))) if retries else self.routing.unavailable_retry_after_s
        what = "overloaded" if status == 429 else "unavailable"
        msg = f"tier {tier} is {what} and no fallback can take the request [{reason}]"
        return Decision("reject", tier, msg, skipped=tuple(skipped), status=status, retry_after_s=wait_s)
