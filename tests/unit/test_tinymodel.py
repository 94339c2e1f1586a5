"""The tiny model generator: deterministic, complete, Hugging Face format, with a chat template."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from serving.backends.tinymodel import MARKER, make_tiny_model


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=5)
    b = make_tiny_model(tmp_path / "b", seed=5)
    c = make_tiny_model(tmp_path / "c", seed=6)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= set(digest(a))
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2


def test_tokenizer_and_chat_template_work(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "m", seed=1))
    assert len(tok) <= 600
    ids = tok.encode("def add(a, b): return a + b")
    assert tok.decode(ids, skip_special_tokens=True) == "def add(a, b): return a + b"
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt == "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_existing_model_is_reused_not_rewritten(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", seed=1)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    make_tiny_model(tmp_path / "m", seed=1)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_writes_the_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "make-tiny-model", str(tmp_path / "cli"), "--seed", "5"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == str(tmp_path / "cli")
    assert digest(tmp_path / "cli") == digest(make_tiny_model(tmp_path / "ref", seed=5))
