"""A tiny random-weight Llama checkpoint with a locally trained tokenizer, for the CPU demo and tests.

No hub is reachable here, so the model is made, not downloaded: a byte-level BPE tokenizer trained on
seeded pseudo-text, a chat template, and a ~0.4M-parameter LlamaForCausalLM, all in Hugging Face format
that vLLM loads like any hub model. Same seed, same bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MARKER = "tierserve-tiny.json"  # written last: a directory without it is incomplete
GENERATOR_VERSION = 2  # part of the cache path: a changed recipe never reuses an old model

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ text }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "def class return import from async await yield lambda if else for while try except with as "
    "the a of to and in is that it was for on are be this have from or by one had not but what all "
    "plan analyze reason step because therefore result answer question code function test review "
    "deploy server model token request tier engine queue fast small large python rust json yaml"
).split()


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words) + rng.choice([".", "?", ":", "()", " {}", ""]))
    return out


def _write(out: Path, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        # Untied: with tied embeddings a random model's argmax mostly echoes its last input token.
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",  # type: ignore[call-arg]  # a PretrainedConfig kwarg the stubs don't list
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    (out / MARKER).write_text(json.dumps({"seed": seed, "vocab_size": len(fast)}, sort_keys=True) + "\n")


def make_tiny_model(directory: str | Path, seed: int = 0, *, force: bool = False) -> Path:
    """Write the tiny model into `directory` (idempotent and safe when several processes race for it)."""
    directory = Path(directory).expanduser().resolve()
    if (directory / MARKER).exists() and not force:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Three tier replicas may start at once: one writes, the others wait on the lock and reuse it.
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / MARKER).exists() and not force:
            return directory
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            _write(tmp, seed)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)  # atomic: readers never see a half-written model
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def cached_tiny_model(cache_dir: str | Path, seed: int) -> Path:
    return make_tiny_model(Path(cache_dir) / "models" / f"tiny-v{GENERATOR_VERSION}-seed{seed}", seed)
