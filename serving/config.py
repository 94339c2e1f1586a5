"""models.yaml: the tier catalog, its profiles, and the settings read from the environment.

The file is a catalog (`tiers`, `ingress`) plus `profiles`, each a partial overlay deep-merged onto the
catalog, so `local` and `gpu` differ only where they must. Everything is validated once at load; an error
names the YAML path of the bad value, pointing into the profile when the value came from the overlay.
"""

from __future__ import annotations

import copy
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TIER_NAME = r"^[a-z][a-z0-9_-]{0,31}$"
# The endpoints a request can be for, a tier serves and a provider may speak: their one home.
# `messages` and `count_tokens` are Anthropic's (/v1/messages, /v1/messages/count_tokens); the rest OpenAI's.
Endpoint = Literal["chat", "completion", "responses", "messages", "count_tokens", "embeddings"]
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)
ANTHROPIC_ENDPOINTS: frozenset[Endpoint] = frozenset({"messages", "count_tokens"})
# The field of each endpoint's request that holds the prompt: what a too-long prompt's error names.
PROMPT_FIELD: dict[Endpoint, str] = {"chat": "messages", "completion": "prompt", "responses": "input",
                                     "messages": "messages", "count_tokens": "messages", "embeddings": "input"}
# What a tier serves by its task: a generating model everything but embeddings, a pooling model only those.
TierTask = Literal["generate", "embed"]
TASK_ENDPOINTS: dict[TierTask, tuple[Endpoint, ...]] = {
    "generate": tuple(e for e in ENDPOINTS if e != "embeddings"),
    "embed": ("embeddings",),
}


def deployment_name(tier: str) -> str:
    """The Ray Serve deployment of a tier (what the app names it and the fleet asks the controller about)."""
    return f"tier-{tier}"


RESERVED_NAMES = frozenset({"auto"})


class ConfigError(ValueError):
    """A models.yaml problem; each line is `yaml.path: what is wrong`."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        head = f"{source}: " if source else ""
        super().__init__(head + ("\n" if len(problems) > 1 else "") + "\n".join(problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(Strict):
    """Where a tier's weights come from: one of a hub repo, a local path, or a generated tiny model."""

    repo: str | None = Field(None, description="Hugging Face repo id, e.g. Qwen/Qwen2.5-7B-Instruct")
    revision: str = Field("main", min_length=1, description="branch, tag or commit of `repo`")
    path: str | None = Field(None, description="local directory in Hugging Face format")
    tiny_seed: int | None = Field(None, ge=0, description="generate the tiny test model with this seed")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("repo", "path", "tiny_seed") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of repo, path, tiny_seed (got {given or 'none'})")
        return self


class EngineArgs(Strict):
    """The vLLM engine arguments a tier may set; `extra` passes rarer AsyncEngineArgs fields through."""

    max_model_len: Annotated[int, Field(gt=0)] = 4096
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    quantization: Literal["awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "bitsandbytes"] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    tensor_parallel_size: Annotated[int, Field(gt=0)] = 1
    max_num_seqs: Annotated[int, Field(gt=0)] = 256
    # vLLM's scheduler: `priority` serves waiting requests by their key's class (interactive, standard, batch),
    # then arrival; with every key in one class that is FCFS. `fcfs` turns the classes off for this tier.
    scheduling_policy: Literal["priority", "fcfs"] = "priority"
    enforce_eager: bool = False
    seed: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _extra_not_typed(self) -> EngineArgs:
        # Both would reach AsyncEngineArgs as the same keyword: a TypeError at engine start, not at validation.
        typed = sorted(set(self.extra) & set(type(self).model_fields))
        if typed:
            raise ValueError(f"extra must not repeat engine settings ({', '.join(typed)}): set them under engine")
        return self


class Resources(Strict):
    """What one replica asks Ray for. GPUs must cover tensor parallelism; `custom` pins tiers to nodes."""

    gpus: Annotated[float, Field(ge=0)] = 0
    cpus: Annotated[float, Field(gt=0)] = 1
    custom: dict[str, float] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict, description="environment of the replica and engine")
    # CPU tiers: run vLLM's engine-core process on the cores its worker is bound to (serving/affinity.py). For
    # a CPU engine that has its cores to itself; with several on a small node they all pile onto the same core.
    colocate_engine_core: bool = False


class Replicas(Strict):
    """Fixed (min == max) or autoscaled replica count; min 0 allows scale-to-zero."""

    min: Annotated[int, Field(ge=0)] = 1
    max: Annotated[int, Field(gt=0)] = 1
    initial: Annotated[int, Field(ge=0)] | None = None
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 32
    # Ray Serve's default of 5 would serialise an engine that batches hundreds of sequences.
    max_ongoing_requests: Annotated[int, Field(gt=0)] = 256
    upscale_delay_s: Annotated[float, Field(ge=0)] = 30
    downscale_delay_s: Annotated[float, Field(ge=0)] = 600
    # Working hours (local time, 'HH:MM-HH:MM', may wrap midnight) during which the tier is pinged so it
    # never goes cold; the ping interval defaults to half the downscale delay.
    keep_warm_hours: Annotated[str, Field(pattern=r"^\d{2}:\d{2}-\d{2}:\d{2}$")] | None = None
    keep_warm_interval_s: Annotated[float, Field(gt=0)] | None = None
    # How requests pick one of the tier's replicas: `session` keeps a conversation on one replica (its prefix
    # cache), load balancing once that replica holds `max_imbalance` more requests than the least loaded
    # (serving/backends/replica_router.py); `balance` is Ray Serve's power of two choices.
    routing: Literal["session", "balance"] = "session"
    max_imbalance: Annotated[int, Field(ge=0)] = 8

    @model_validator(mode="after")
    def _bounds(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must be between min and max")
        if self.keep_warm_hours is not None:
            for part in self.keep_warm_hours.split("-"):
                try:
                    time.fromisoformat(part)
                except ValueError:
                    raise ValueError(f"keep_warm_hours: {part!r} is not a time of day (HH:MM)") from None
        return self

    def keep_warm(self) -> tuple[str, float] | None:
        if self.keep_warm_hours is None:
            return None
        return self.keep_warm_hours, self.keep_warm_interval_s or max(self.downscale_delay_s / 2, 1.0)

    def autoscaling_config(self) -> dict[str, Any] | None:
        if self.min == self.max:
            return None
        return {
            "min_replicas": self.min,
            "max_replicas": self.max,
            "initial_replicas": self.initial,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


class Tier(Strict):
    served_name: str = Field(min_length=1, description="the model name responses carry")
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    model: ModelSource
    engine: EngineArgs = EngineArgs()
    resources: Resources = Resources()
    replicas: Replicas = Replicas()
    # Defined further down; the factories keep the names resolvable.
    overflow: OverflowPolicy = Field(default_factory=lambda: OverflowPolicy())
    slots: Slots = Field(default_factory=lambda: Slots())
    cost_per_gpu_hour_usd: Annotated[float, Field(ge=0)] | None = None  # to compare local cost with providers
    # What an hour of this tier costs (its share of the node); None: cost_per_gpu_hour_usd x resources.gpus.
    # Charged to API keys per request-second (serving/spend/pricing.py).
    cost_per_hour_usd: Annotated[float, Field(ge=0)] | None = None
    # Largest max_tokens a request may ask of this tier; None: the tier's engine.max_model_len.
    max_tokens_cap: Annotated[int, Field(gt=0)] | None = None
    # `embed` runs the model with vLLM's pooling runner: it then serves /v1/embeddings and nothing else.
    task: TierTask = "generate"
    # vLLM's tool-call parser for this model (`hermes` for Qwen2.5 and the tiny models); setting it turns on
    # tool_choice "auto". None: only tool_choice "none", "required" and a named function work.
    tool_call_parser: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    # How far vLLM's grammar constrains tool calls (its --tool-strict-level): `auto` as each tool's own `strict`
    # says; `function` the call's envelope always; `parameter` the arguments to each tool's schema as well.
    tool_strict_level: Literal["auto", "function", "parameter"] = "auto"
    # vLLM's reasoning parser (e.g. `deepseek_r1`, `qwen3`): thinking is returned apart from the answer.
    reasoning_parser: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    # A Jinja chat template file (relative to models.yaml) instead of the one that comes with the model.
    chat_template: str | None = None
    # Deterministic answers of this tier (temperature 0 or a fixed seed) are kept in the ingress's response
    # cache (`cache.responses`) for keys that opt in too; off by default: a replay is not a fresh sample.
    response_cache: bool = False

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return TASK_ENDPOINTS[self.task]

    @model_validator(mode="after")
    def _gpus_cover_tp(self) -> Tier:
        if self.engine.tensor_parallel_size > 1 and self.resources.gpus < self.engine.tensor_parallel_size:
            raise ValueError(
                f"resources.gpus ({self.resources.gpus}) must be >= engine.tensor_parallel_size "
                f"({self.engine.tensor_parallel_size})"
            )
        return self

    @model_validator(mode="after")
    def _batch_leaves_slots_free(self) -> Tier:
        cap, seqs = self.slots.batch_per_replica, self.engine.max_num_seqs
        if cap is not None and cap >= seqs:
            raise ValueError(f"slots.batch_per_replica ({cap}) must be below engine.max_num_seqs ({seqs}): "
                             "at or above it, batch requests can still hold every slot")
        return self


class IngressConfig(Strict):
    cpus: Annotated[float, Field(ge=0)] = 0.25
    max_ongoing_requests: Annotated[int, Field(gt=0)] = 2048
    # One replica: /metrics counters live in the ingress process (more replicas would split them).
    replicas: Annotated[int, Field(gt=0)] = 1
    ready_cache_s: Annotated[float, Field(ge=0)] = 5.0  # /health/ready reuses a probe this long
    ready_timeout_s: Annotated[float, Field(gt=0)] = 10.0  # a probe slower than this marks the tier failing
    # No request waits longer than this for its whole answer (non-streamed) or its first byte (streamed).
    request_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # A tier whose engine runs inside the ingress replica itself: its requests skip the ingress -> tier Ray
    # hop (one process handles HTTP and vLLM's serving code, as in bare vLLM). The tier then lives and dies
    # with the ingress replica and cannot autoscale or scale to zero; other tiers are unaffected.
    embed_tier: str | None = None
    # Ray resources the gateway's replicas (ingress, fallback) ask for on top of their CPUs. In a cluster,
    # `node:__internal_head__: 0.01` keeps them on the head, which outlives the worker nodes (and holds the
    # fallback's budgets on its disk).
    custom: dict[str, float] = Field(default_factory=dict)


TierName = Annotated[str, Field(pattern=TIER_NAME)]


class AppConfig(Strict):
    """One profile's effective configuration: what the application is built from."""

    version: Literal[1] = 1
    profile: str = "base"
    tiers: dict[TierName, Tier] = Field(min_length=1)
    ingress: IngressConfig = IngressConfig()
    providers: list[Provider] = Field(default_factory=list)
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    auth: AuthConfig = Field(default_factory=lambda: AuthConfig())
    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig())
    cache: CacheConfig = Field(default_factory=lambda: CacheConfig())

    @model_validator(mode="after")
    def _routing_refs(self) -> AppConfig:
        seen: set[str] = set()
        for i, provider in enumerate(self.providers):
            if provider.name in seen:
                raise ValueError(f"providers.{i}.name: '{provider.name}' is used twice")
            seen.add(provider.name)
            unknown = sorted(set(provider.models) - set(self.tiers))
            if unknown:
                raise ValueError(f"providers.{i}.models: unknown tier(s) {', '.join(unknown)}")
        for i, rule in enumerate(self.routing.rules):
            if rule.tier not in self.tiers:
                raise ValueError(f"routing.rules.{i}.tier: unknown tier '{rule.tier}'")
        # The default `fast` may be absent from a catalog (router then takes the first tier); a value
        # written in the file must exist.
        if "default_tier" in self.routing.model_fields_set and self.routing.default_tier not in self.tiers:
            raise ValueError(f"routing.default_tier: unknown tier '{self.routing.default_tier}'")
        return self

    @model_validator(mode="after")
    def _embedded_tier(self) -> AppConfig:
        name = self.ingress.embed_tier
        if name is None:
            return self
        if name not in self.tiers:
            raise ValueError(f"ingress.embed_tier: unknown tier '{name}'")
        replicas = self.tiers[name].replicas
        want = self.ingress.replicas
        if not replicas.min == replicas.max == want:
            raise ValueError(
                f"ingress.embed_tier: tier '{name}' runs in the ingress replicas, which do not autoscale: its "
                f"replicas need min = max = ingress.replicas ({want}), not min {replicas.min}, max {replicas.max}"
            )
        return self

    @model_validator(mode="after")
    def _names_unique(self) -> AppConfig:
        owner: dict[str, str] = {}
        for tier_name, tier in self.tiers.items():
            for name in (tier_name, tier.served_name, *tier.aliases):
                if name in RESERVED_NAMES:
                    raise ValueError(f"tiers.{tier_name}: '{name}' is reserved")
                if owner.get(name, tier_name) != tier_name:
                    used_by = owner[name]
                    raise ValueError(f"tiers.{tier_name}: name '{name}' is already used by tier {used_by}")
                owner[name] = tier_name
        return self

    def model_names(self) -> dict[str, str]:
        """Every name a request may use (tier, served name, alias) -> tier name."""
        names: dict[str, str] = {}
        for tier_name, tier in self.tiers.items():
            for name in (tier_name, tier.served_name, *tier.aliases):
                names[name] = tier_name
        return names


class Settings(BaseSettings):
    """Process settings from the environment (TIERSERVE_*); the catalog itself lives in models.yaml."""

    model_config = SettingsConfigDict(env_prefix="TIERSERVE_", extra="ignore")

    config: Path = Path("models.yaml")
    profile: str = "local"
    cache_dir: Path = Path.home() / ".cache" / "tierserve"  # regenerable: generated tiny models
    state_dir: Path = Path.home() / ".local" / "state" / "tierserve"  # must survive restarts: budgets, usage
    host: str = "127.0.0.1"
    port: int = 8000


# A model source is one choice (repo | path | tiny_seed): an overlay replaces it whole, never merges into it.
ATOMIC_KEYS = frozenset({"model"})


def deep_merge(base: Any, overlay: Any) -> Any:
    """Overlay wins; mappings merge key by key, everything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            atomic = key in ATOMIC_KEYS
            merged[key] = deep_merge(base[key], value) if key in base and not atomic else copy.deepcopy(value)
        return merged
    return copy.deepcopy(overlay)


def _loc_in(tree: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _problems(exc: ValidationError, overlay: dict[str, Any], profile: str | None) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # A model_validator's message already names its field; point at the object it checked.
        prefix = f"profiles.{profile}." if profile and overlay and _loc_in(overlay, loc) else ""
        path = prefix + ".".join(str(p) for p in loc) if loc else "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err and not isinstance(
            err["input"], dict | list
        ):
            msg += f" (got {err['input']!r})"
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"{path}: {msg}")
    return problems


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(path)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f"line {where.line + 1}: " if where else ""
        raise ConfigError([f"{line}invalid YAML: {getattr(exc, 'problem', exc)}"], str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping with `tiers`"], str(path))
    return data


def build_config(data: dict[str, Any], profile: str | None, source: str = "") -> AppConfig:
    data = dict(data)
    profiles = data.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(["profiles: must be a mapping of profile name -> overlay"], source)
    overlay: dict[str, Any] = {}
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError([f"profiles.{profile}: no such profile (known: {known})"], source)
        overlay = profiles[profile] or {}
        if not isinstance(overlay, dict):
            raise ConfigError([f"profiles.{profile}: must be a mapping"], source)
    merged = deep_merge(data, overlay)
    merged.setdefault("profile", profile or "base")
    try:
        return AppConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, overlay, profile), source) from exc


def load_config(path: str | Path, profile: str | None = None) -> AppConfig:
    """Load one profile of a models.yaml (the bare catalog when `profile` is None)."""
    path = Path(path)
    config = build_config(read_yaml(path), profile, str(path))
    return config.model_copy(update={"tiers": _resolve_paths(config.tiers, path.resolve())})


def _resolve_paths(tiers: dict[str, Tier], source: Path) -> dict[str, Tier]:
    """Relative model and chat template paths are relative to models.yaml, so replicas find them whatever
    their cwd; a chat template that is not there is a load error, not a replica that fails to start."""
    base = source.parent
    out = {}
    problems = []
    for name, tier in tiers.items():
        if tier.model.path and not Path(tier.model.path).expanduser().is_absolute():
            model = tier.model.model_copy(update={"path": str(base / tier.model.path)})
            tier = tier.model_copy(update={"model": model})
        if tier.chat_template is not None:
            template = base / Path(tier.chat_template).expanduser()
            if not template.is_file():
                problems.append(f"tiers.{name}.chat_template: no such file: {template}")
            tier = tier.model_copy(update={"chat_template": str(template)})
        out[name] = tier
    if problems:
        raise ConfigError(problems, str(source))
    return out


def validate_file(path: str | Path) -> list[str]:
    """Check the catalog and every profile; return the problems found (empty when the file is good)."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        return exc.problems
    profiles = data.get("profiles") or {}
    problems: list[str] = []
    for profile in [None, *(profiles if isinstance(profiles, dict) else [])]:
        try:
            build_config(data, profile)
        except ConfigError as exc:
            problems.extend(p for p in exc.problems if p not in problems)
    return problems



# -- routing, overflow and external providers -------------------------------------------------------------

ENV_VAR_NAME = r"^[A-Z_][A-Z0-9_]*$"  # upper case only: a pasted key (`sk-...`) fails here, not in a log
ProviderKind = Literal["openai", "anthropic", "gradient", "ollama", "vllm", "tierserve"]
# What each kind of upstream speaks, unless a provider lists its `endpoints`.
KIND_ENDPOINTS: dict[str, tuple[Endpoint, ...]] = {
    "openai": ("chat", "completion", "responses", "embeddings"),
    "anthropic": ("chat", "messages", "count_tokens"),  # chat: Anthropic's OpenAI-compatible endpoint
    "gradient": ("chat", "completion"),
    "ollama": ("chat", "completion", "embeddings"),
    "vllm": ENDPOINTS,
    "tierserve": ENDPOINTS,
}


class Provider(Strict):
    """An upstream used as fallback; `base_url` ends where each endpoint's path (`/chat/completions`,
    `/messages`, ...) is appended."""

    name: Annotated[str, Field(pattern=TIER_NAME)]
    # The API it speaks: OpenAI's for every kind, except `anthropic`, whose Messages endpoints are native.
    kind: ProviderKind = "openai"
    base_url: Annotated[str, Field(pattern=r"^https?://")]
    api_key_env: Annotated[str, Field(pattern=ENV_VAR_NAME)] | None = Field(
        None, description="NAME of the environment variable holding the key; the key never goes in this file"
    )
    models: dict[str, str] = Field(default_factory=dict, description="tier -> upstream model name")
    default_model: str | None = Field(None, description="upstream model for tiers not in `models`")
    # The endpoints it serves; default: what its kind speaks (KIND_ENDPOINTS).
    endpoints: list[Endpoint] = Field(default_factory=list)
    max_context: Annotated[int, Field(gt=0)] = 8192
    timeout_connect_s: Annotated[float, Field(gt=0)] = 15
    timeout_read_s: Annotated[float, Field(gt=0)] = 15  # the longest silence between bytes, streams included
    # Non-streamed: the whole answer; streamed: up to the first chunk (retries included), so a long stream
    # is never cut by a total deadline, only by `timeout_read_s` of silence.
    timeout_total_s: Annotated[float, Field(gt=0)] = 15
    price_input_per_1m_usd: Annotated[float, Field(ge=0)] = 0
    price_output_per_1m_usd: Annotated[float, Field(ge=0)] = 0
    paid: bool = False
    enabled: bool = True
    budget_daily_usd: Annotated[float, Field(ge=0)] | None = None  # None: no limit; 0: never spend
    budget_monthly_usd: Annotated[float, Field(ge=0)] | None = None
    retries: Annotated[int, Field(ge=0, le=10)] = 2  # extra attempts, only before the first byte
    priority: int = 100  # lower is tried first; ties keep file order
    stream_usage: bool = True  # ask for `stream_options.include_usage` so streamed spend is accounted

    @model_validator(mode="before")
    @classmethod
    def _kind_endpoints(cls, data: Any) -> Any:
        if isinstance(data, dict) and "endpoints" not in data:
            kind = data.get("kind", "openai")
            data = {**data, "endpoints": list(KIND_ENDPOINTS.get(kind, ()))}
        return data

    @model_validator(mode="after")
    def _has_model(self) -> Provider:
        if not self.models and not self.default_model:
            raise ValueError("set `models` (tier -> upstream model) or `default_model`")
        return self

    def upstream_model(self, tier: str) -> str | None:
        """The model to ask this provider for on behalf of `tier` (None: it does not serve that tier)."""
        return self.models.get(tier, self.default_model)


class AutoRule(Strict):
    """One `auto` routing rule: matches when any given matcher hits (and the size floor, if set, is met)."""

    tier: str
    name: str | None = None  # shows in the route reason; defaults to the matcher that hit
    keywords: list[str] = Field(default_factory=list, description="case-insensitive whole words of the prompt")
    regex: str | None = Field(None, description="Python regex searched in the prompt (case-insensitive)")
    code: bool = False  # code-like content (fences, def/class/import, braces and semicolons)
    min_prompt_tokens: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _valid(self) -> AutoRule:
        import re

        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex: {exc}") from None
        if not (self.keywords or self.regex or self.code or self.min_prompt_tokens is not None):
            raise ValueError("a rule needs keywords, regex, code or min_prompt_tokens")
        return self


class BreakerConfig(Strict):
    failures: Annotated[int, Field(gt=0)] = 3  # consecutive failures that open the breaker
    cooldown_s: Annotated[float, Field(gt=0)] = 300  # open this long, then one half-open probe
    probe_timeout_s: Annotated[float, Field(gt=0)] = 120  # a probe that never reports frees its slot after this


class EjectionConfig(Strict):
    """Tier outlier ejection (serving/gateway/ejection.py): a tier whose replica died leaves routing at once."""

    enabled: bool = True
    consecutive_failures: Annotated[int, Field(gt=0)] = 3  # replica-gone failures in a row that eject the tier
    # A tier's first byte this late makes the ingress re-read the controller's replica states: no RUNNING
    # replica ejects the tier, and the waiting requests go elsewhere instead of waiting for a replacement.
    first_byte_check_s: Annotated[float, Field(gt=0)] = 1.0
    probe_timeout_s: Annotated[float, Field(gt=0)] = 5.0  # an ejected tier's probe; one per tier at a time


class RoutingConfig(Strict):
    default_tier: str = "fast"  # `auto` when no rule matches (first tier if this one is not configured)
    rules: list[AutoRule] = Field(default_factory=list)
    pin_header: Annotated[str, Field(pattern=r"^[a-z0-9-]+$")] = "x-tierserve-tier"
    allow_paid: bool = False  # zero-budget mode: paid providers are never contacted
    # Requests of `batch` keys may go to paid providers; by default they wait in their tier's queue instead.
    batch_spills_to_paid: bool = False
    chars_per_token: Annotated[float, Field(gt=0)] = 4.0  # prompt size estimate when no count is given
    scan_chars: Annotated[int, Field(gt=0)] = 8192  # rules read this much of the last user message (both ends)
    retry_after_s: Annotated[int, Field(gt=0)] = 2  # Retry-After of a 429 (saturated)
    unavailable_retry_after_s: Annotated[int, Field(gt=0)] = 10  # Retry-After of a 503 (no replica, cold)
    breaker: BreakerConfig = BreakerConfig()
    ejection: EjectionConfig = EjectionConfig()


class OverflowPolicy(Strict):
    """When a request leaves a tier's local engines. Unset limits never trigger."""

    max_queue_per_replica: Annotated[int, Field(gt=0)] | None = None  # ongoing requests per healthy replica
    max_engine_waiting: Annotated[int, Field(ge=0)] | None = None  # vLLM's waiting count, summed over replicas
    max_wait_s: Annotated[float, Field(gt=0)] | None = None  # against the caller's wait estimate
    on_unavailable: Literal["fallback", "reject"] = "fallback"  # saturated or no healthy replica
    cold_start: Literal["wait", "fallback"] = "wait"  # scaled to zero and warming up
    max_cold_wait_s: Annotated[float, Field(gt=0)] = 120  # `wait`: then the next candidate is tried


class Slots(Strict):
    """A tier's engine slots that batch keys may hold (serving/gateway/slots.py). vLLM does not preempt a
    running request for a waiting interactive one: slots kept from batch work are what an interactive agent
    finds free when a batch key saturates the tier."""

    # Requests of `batch` keys in flight per running replica; the next wait in the gateway. None: no cap.
    batch_per_replica: Annotated[int, Field(gt=0)] | None = None


# -- API keys and input limits ----------------------------------------------------------------------------


class AuthConfig(Strict):
    """API keys per agent (serving/security/). Disabling auth is explicit and the server warns loudly at start."""

    enabled: bool = True
    # Key store (JSON, hashed keys only). Precedence: TIERSERVE_KEYS_FILE, this, <state_dir>/keys.json.
    keys_file: str | None = None
    # Per-key usage and spend (SQLite, serving/spend/ledger.py). None: <state_dir>/usage.db.
    usage_db: str | None = None
    reload_interval_s: Annotated[float, Field(ge=0)] = 1.0  # the key file is re-stat'ed at most this often
    log_prompts: bool = False  # prompts and completions reach the logs only when this is true


class LimitsConfig(Strict):
    """Input limits checked by the ingress before a request reaches a tier (serving/gateway/limits.py)."""

    max_body_bytes: Annotated[int, Field(gt=0)] = 1 << 20
    max_messages: Annotated[int, Field(gt=0)] = 512  # chat messages, or prompts of a batched completion
    max_chars_per_message: Annotated[int, Field(gt=0)] = 200_000
    max_n: Annotated[int, Field(gt=0)] = 4
    max_tools: Annotated[int, Field(gt=0)] = 128  # tool definitions per request (chat, responses, messages)
    max_embedding_inputs: Annotated[int, Field(gt=0)] = 2048  # inputs of one embeddings request
    # Default max_tokens cap for tiers without `max_tokens_cap`; None: the tier's engine.max_model_len.
    max_tokens_cap: Annotated[int, Field(gt=0)] | None = None
    body_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # a slow upload is cut (408) after this
    strict_params: bool = True  # unknown top-level request fields are a 400, not silently ignored
    extra_params: list[str] = Field(default_factory=list, description="more top-level fields to accept")
    # vLLM internals an agent must not set: queue priority over other agents, disaggregation plumbing,
    # engine request ids (a duplicate collides with a running request), server-side Jinja templates.
    denied_params: list[str] = Field(
        default_factory=lambda: [
            "priority", "kv_transfer_params", "ec_transfer_params", "request_id", "chat_template",
        ]
    )


# -- caches ---------------------------------------------------------------------------------------------------


class ResponseCacheConfig(Strict):
    """The ingress's cache of deterministic answers (serving/gateway/response_cache.py), per ingress replica."""

    max_entries: Annotated[int, Field(gt=0)] = 1024
    max_bytes: Annotated[int, Field(gt=0)] = 64 << 20  # answers' bodies or stream chunks, summed
    ttl_s: Annotated[float, Field(gt=0)] = 600.0


class CacheConfig(Strict):
    """Who shares cached work. `isolation` scopes both vLLM's prefix cache (tierserve sets each request's
    `cache_salt`, and ignores the client's) and the response cache: `team` (keys of one team share, a key
    without a team is its own), `key` (every key alone), or `shared` (everyone: timing then tells one agent
    whether another sent the same prefix)."""

    isolation: Literal["team", "key", "shared"] = "team"
    responses: ResponseCacheConfig = ResponseCacheConfig()


class AuthSettings(BaseSettings):
    """Auth settings that belong to the machine, not the catalog: TIERSERVE_KEYS_FILE, TIERSERVE_ADMIN_KEY_SHA256."""

    model_config = SettingsConfigDict(env_prefix="TIERSERVE_", extra="ignore")

    keys_file: Path | None = None
    # sha256 hex of the whole admin key (`printf %s "$KEY" | sha256sum`); the key itself never goes in env.
    admin_key_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None


# Tier and AppConfig name the models above before they exist; resolve those references now.
Tier.model_rebuild()
AppConfig.model_rebuild()
