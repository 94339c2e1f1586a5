"""Metadata-only Hugging Face checkpoints for the fit check's tests.

Each checkpoint is what a hub repo holds minus the weights: config.json, model.safetensors.index.json and
safetensors shards cut right after their header (8 bytes little-endian length, then JSON of
{name: {dtype, shape, data_offsets}}). Shapes are the published config.json shapes of the Qwen2.5 and Qwen3
families; the tensor layouts are those of their bf16, AWQ (GEMM, int4, group 128), GPTQ and block-fp8
checkpoints. `CATALOG` maps the hub repo ids models.yaml uses to a writer of their checkpoint.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.config import ModelSource
from serving.ops.fit import MetadataError, ModelMetadata, read_model_dir

Shape = tuple[int, ...]
BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1}
GROUP = 128

# name -> (hidden, intermediate, layers, heads, kv heads): Qwen2.5 config.json (vocab 152064; the Instruct
# and Coder-Instruct repos of one size share these).
QWEN25: dict[str, tuple[int, int, int, int, int]] = {
    "7B": (3584, 18944, 28, 28, 4),
    "14B": (5120, 13824, 48, 40, 8),
    "32B": (5120, 27648, 64, 40, 8),
    "72B": (8192, 29568, 80, 64, 8),
}
# Qwen3 (head_dim 128, vocab 151936; 4B ties its embeddings).
QWEN3: dict[str, tuple[int, int, int, int, int]] = {
    "4B": (2560, 9728, 36, 32, 8),
    "8B": (4096, 12288, 36, 32, 8),
    "14B": (5120, 17408, 40, 40, 8),
    "32B": (5120, 25600, 64, 64, 8),
}
# Published parameter counts (the hub's safetensors "Model size"), which the bf16 layouts reproduce.
PARAMS = {"Qwen2.5-7B": 7_615_616_512, "Qwen2.5-14B": 14_770_033_664, "Qwen2.5-32B": 32_763_876_352,
          "Qwen2.5-72B": 72_706_203_648}

AWQ_CONFIG = {"bits": 4, "group_size": GROUP, "modules_to_not_convert": None, "quant_method": "awq",
              "version": "gemm", "zero_point": True}
GPTQ_CONFIG = {"bits": 4, "group_size": GROUP, "desc_act": False, "quant_method": "gptq", "sym": True}
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def qwen25_config(size: str, *, intermediate: int | None = None) -> dict[str, Any]:
    hidden, inter, layers, heads, kv = QWEN25[size]
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate or inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 32768,
        "max_window_layers": layers, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 131072,
        "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "vocab_size": 152064,
    }


def qwen3_config(size: str, *, max_positions: int = 40960) -> dict[str, Any]:
    hidden, inter, layers, heads, kv = QWEN3[size]
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": size == "4B", "torch_dtype": "bfloat16", "vocab_size": 151936,
    }


def qwen3_moe_config() -> dict[str, Any]:
    """Qwen3-30B-A3B (Instruct-2507 and Coder-30B-A3B-Instruct: 262144 positions)."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 128, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6, "rope_theta": 10000000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "vocab_size": 151936,
    }


def logical_tensors(config: dict[str, Any], *, store_tied_head: bool = False) -> list[tuple[str, Shape, str]]:
    """(name, shape, kind) of a Qwen2/Qwen3(-MoE) decoder in its unquantized form; kind is linear (an (out, in)
    weight quantization packs), router, or plain (embeddings, norms, biases)."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    qwen2 = config["model_type"] == "qwen2"
    out: list[tuple[str, Shape, str]] = [("model.embed_tokens.weight", (vocab, h), "plain")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "plain"), (p + "post_attention_layernorm.weight", (h,), "plain")]
        for proj, rows, cols in (("q", heads * hd, h), ("k", kv * hd, h), ("v", kv * hd, h), ("o", h, heads * hd)):
            out.append((f"{p}self_attn.{proj}_proj.weight", (rows, cols), "linear"))
            if qwen2 and proj != "o":
                out.append((f"{p}self_attn.{proj}_proj.bias", (rows,), "plain"))
        if not qwen2:
            out += [(p + "self_attn.q_norm.weight", (hd,), "plain"), (p + "self_attn.k_norm.weight", (hd,), "plain")]
        if config.get("num_experts"):
            mi = config["moe_intermediate_size"]
            out.append((p + "mlp.gate.weight", (config["num_experts"], h), "router"))
            for e in range(config["num_experts"]):
                q = f"{p}mlp.experts.{e}."
                out += [(q + "gate_proj.weight", (mi, h), "linear"), (q + "up_proj.weight", (mi, h), "linear"),
                        (q + "down_proj.weight", (h, mi), "linear")]
        else:
            inter = config["intermediate_size"]
            out += [(p + "mlp.gate_proj.weight", (inter, h), "linear"),
                    (p + "mlp.up_proj.weight", (inter, h), "linear"),
                    (p + "mlp.down_proj.weight", (h, inter), "linear")]
    out.append(("model.norm.weight", (h,), "plain"))
    if not config.get("tie_word_embeddings") or store_tied_head:
        out.append(("lm_head.weight", (vocab, h), "plain"))
    return out


def stored_tensors(logical: list[tuple[str, Shape, str]], fmt: str) -> dict[str, tuple[str, Shape]]:
    """The tensors a checkpoint of format bf16 | awq | gptq | fp8 stores for these logical tensors."""
    out: dict[str, tuple[str, Shape]] = {}
    for name, shape, kind in logical:
        if kind != "linear" or fmt == "bf16":
            out[name] = ("F16" if fmt in ("awq", "gptq") else "BF16", shape)
            continue
        rows, cols = shape  # (out_features, in_features)
        base = name.removesuffix(".weight")
        if fmt == "awq":  # GEMM layout: packed along out_features, 8 int4 per int32
            out[base + ".qweight"] = ("I32", (cols, rows // 8))
            out[base + ".qzeros"] = ("I32", (cols // GROUP, rows // 8))
            out[base + ".scales"] = ("F16", (cols // GROUP, rows))
        elif fmt == "gptq":  # packed along in_features
            out[base + ".qweight"] = ("I32", (cols // 8, rows))
            out[base + ".qzeros"] = ("I32", (cols // GROUP, rows // 8))
            out[base + ".scales"] = ("F16", (cols // GROUP, rows))
            out[base + ".g_idx"] = ("I32", (cols,))
        elif fmt == "fp8":  # block-wise 128 x 128 scales, bf16 as in Qwen's FP8 repos
            out[name] = ("F8_E4M3", shape)
            out[base + ".weight_scale_inv"] = ("BF16", (math.ceil(rows / 128), math.ceil(cols / 128)))
        else:
            raise ValueError(fmt)
    return out


def write_header_only(path: Path, tensors: dict[str, tuple[str, Shape]]) -> int:
    """A safetensors file with its header and no data; returns the data bytes the header declares."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return offset


def write_checkpoint(directory: Path, config: dict[str, Any], tensors: dict[str, tuple[str, Shape]],
                     shards: int = 3) -> Path:
    """config.json, a sharded index and header-only shards, as a hub repo lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        total += write_header_only(directory / shard, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def checkpoint(config: dict[str, Any], fmt: str, *, store_tied_head: bool = False) -> tuple[dict[str, Any], dict]:
    config = dict(config)
    if fmt in ("awq", "gptq"):
        config["torch_dtype"] = "float16"
        config["quantization_config"] = AWQ_CONFIG if fmt == "awq" else GPTQ_CONFIG
    elif fmt == "fp8":
        config["quantization_config"] = FP8_CONFIG
    return config, stored_tensors(logical_tensors(config, store_tied_head=store_tied_head), fmt)


Writer = Callable[[], tuple[dict[str, Any], dict]]

# The repos models.yaml's GPU profiles use, as metadata-only checkpoints.
CATALOG: dict[str, Writer] = {
    "Qwen/Qwen2.5-7B-Instruct": lambda: checkpoint(qwen25_config("7B"), "bf16"),
    "Qwen/Qwen2.5-7B-Instruct-AWQ": lambda: checkpoint(qwen25_config("7B"), "awq"),
    "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ": lambda: checkpoint(qwen25_config("7B"), "awq"),
    "Qwen/Qwen2.5-14B-Instruct": lambda: checkpoint(qwen25_config("14B"), "bf16"),
    "Qwen/Qwen2.5-Coder-14B-Instruct-AWQ": lambda: checkpoint(qwen25_config("14B"), "awq"),
    "Qwen/Qwen2.5-32B-Instruct": lambda: checkpoint(qwen25_config("32B"), "bf16"),
    "Qwen/Qwen2.5-32B-Instruct-AWQ": lambda: checkpoint(qwen25_config("32B"), "awq"),
    "Qwen/Qwen2.5-Coder-32B-Instruct-AWQ": lambda: checkpoint(qwen25_config("32B"), "awq"),
    "Qwen/Qwen2.5-72B-Instruct": lambda: checkpoint(qwen25_config("72B"), "bf16"),
    # The AWQ repo pads the MLP to 29696 so it splits into int4 groups under tensor parallelism.
    "Qwen/Qwen2.5-72B-Instruct-AWQ": lambda: checkpoint(qwen25_config("72B", intermediate=29696), "awq"),
    "Qwen/Qwen2.5-72B-Instruct-GPTQ-Int4": lambda: checkpoint(qwen25_config("72B", intermediate=29696), "gptq"),
    "Qwen/Qwen3-4B-Instruct-2507-FP8": lambda: checkpoint(qwen3_config("4B", max_positions=262144), "fp8",
                                                          store_tied_head=True),
    "Qwen/Qwen3-4B-Instruct-2507": lambda: checkpoint(qwen3_config("4B", max_positions=262144), "bf16"),
    "Qwen/Qwen3-4B-Thinking-2507-FP8": lambda: checkpoint(qwen3_config("4B", max_positions=262144), "fp8",
                                                          store_tied_head=True),
    "Qwen/Qwen3-8B-AWQ": lambda: checkpoint(qwen3_config("8B"), "awq"),
    "Qwen/Qwen3-14B-AWQ": lambda: checkpoint(qwen3_config("14B"), "awq"),
    "Qwen/Qwen3-32B-AWQ": lambda: checkpoint(qwen3_config("32B"), "awq"),
    "Qwen/Qwen3-32B": lambda: checkpoint(qwen3_config("32B"), "bf16"),
    "Qwen/Qwen3-32B-FP8": lambda: checkpoint(qwen3_config("32B"), "fp8"),
    "Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8": lambda: checkpoint(qwen3_moe_config(), "fp8"),
}


class FixtureLookup:
    """A MetadataLookup serving CATALOG's checkpoints, written on first use under `root` and read back with
    the fit check's own directory reader; other sources fall through to `fallback`."""

    def __init__(self, root: Path, fallback: Callable[[ModelSource], ModelMetadata] | None = None) -> None:
        self.root = root
        self.fallback = fallback
        self.asked: list[str] = []

    def directory(self, repo: str) -> Path:
        path = self.root / repo.replace("/", "--")
        if not (path / "model.safetensors.index.json").exists():
            config, tensors = CATALOG[repo]()
            write_checkpoint(path, config, tensors)
        return path

    def __call__(self, source: ModelSource) -> ModelMetadata:
        if source.repo is None:
            if self.fallback is None:
                raise MetadataError(f"no fixture for {source}")
            return self.fallback(source)
        self.asked.append(source.repo)
        if source.repo not in CATALOG:
            raise MetadataError(f"{source.repo}: no fixture in tests/support/modelmeta.py")
        return read_model_dir(self.directory(source.repo))
