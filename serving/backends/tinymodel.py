"""Tiny random-weight Llama checkpoints with a locally trained tokenizer, for the CPU demo and tests.

No hub is reachable here, so the models are made, not downloaded: a byte-level BPE tokenizer trained on
seeded pseudo-text, a chat template, and a ~0.4M-parameter Llama, all in Hugging Face format that vLLM loads
like any hub model. Same seed, same bytes. Two kinds: a LlamaForCausalLM to generate with, and a LlamaModel
laid out as a Sentence Transformers model (mean pooling, normalised), which vLLM serves on /v1/embeddings.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512  # an upper bound: the trained vocabulary may come out a few tokens smaller
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# Whole tokens, as in Qwen2.5 and Qwen3, so that a call costs a model one token per tag. Not special: a
# detokenizer that skips special tokens must keep them, or vLLM's hermes tool parser never sees the tags.
# The thinking tags are there for vLLM's reasoning parsers, which refuse a tokenizer without them.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
MARKER = "tierserve-tiny.json"  # written last: a directory without it is incomplete
GENERATOR_VERSION = 6  # part of the cache path: a changed recipe never reuses an old model

# Plain turns render as `<|role|>\ntext\n`. Tools follow Qwen2.5's hermes format, which vLLM's `hermes` tool
# parser reads back: the tool list in the system turn, calls as <tool_call> JSON, results as <tool_response>
# blocks in a user turn. Written with `{%-`/`{{-` on every line: transformers renders with trim_blocks and
# lstrip_blocks, so every newline of the output is an explicit '\n'. Kept to what vLLM's template inspection
# can walk (it asserts that a `set` from `messages` assigns a plain name), so it detects the "string" format.
CHAT_TEMPLATE = r"""
{%- macro text_of(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {{- content | map(attribute='text') | join('') }}
    {%- endif %}
{%- endmacro %}
{{- bos_token }}
{%- set system_in_tools = tools and messages and messages[0]['role'] == 'system' %}
{%- if tools %}
    {{- '<|system|>\n' }}
    {%- if system_in_tools %}
        {{- text_of(messages[0]['content']) + '\n\n' }}
    {%- endif %}
    {#- Qwen2.5's wording, shortened: the tiny tokenizer spends a token on every few letters of English. #}
    {{- '# Tools\n\nFunctions you may call, within <tools></tools>:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call one, answer with its name and arguments as JSON within <tool_call></tool_call>:\n' }}
    {{- '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set text = text_of(message['content']) %}
    {%- if loop.first and system_in_tools %}
    {%- elif message['role'] == 'tool' %}
        {%- if loop.first or loop.previtem['role'] != 'tool' %}
            {{- '<|user|>\n' }}
        {%- endif %}
        {{- '<tool_response>\n' + text + '\n</tool_response>\n' }}
    {%- else %}
        {{- '<|' + message['role'] + '|>\n' + text }}
        {%- if message['role'] == 'assistant' and message['tool_calls'] %}
            {%- for call in message['tool_calls'] %}
                {%- set fn = call['function'] if call['function'] is defined else call %}
                {%- set args = fn['arguments'] if fn['arguments'] is defined and fn['arguments'] is not none else {} %}
                {%- if text or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {{- '<tool_call>\n{"name": ' + (fn['name'] | tojson) + ', "arguments": ' }}
                {#- vLLM hands arguments over as a dict; other callers may pass the OpenAI JSON string as is. #}
                {{- args if args is string else args | tojson }}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- endif %}
""".strip()

_WORDS = (
    "def class return import from async await yield lambda if else for while try except with as "
    "the a of to and in is that it was for on are be this have from or by one had not but what all "
    "plan analyze reason step because therefore result answer question code function test review "
    "deploy server model token request tier engine queue fast small large python rust json yaml"
).split()


# Tool prompts must fit a tiny tier's 512-token context: the corpus also holds JSON of the shapes tool lists and
# calls take, and the template's own text, so that the tokenizer learns them (a small tool's JSON takes about 65
# tokens, not 150).
_JSON_WORDS = (
    "type function name description parameters properties string object integer number boolean array "
    "items enum required arguments city query location unit"
).split()
_TEMPLATE_LINES = [
    *(f"<|{role}|>" for role in ("system", "user", "assistant", "tool")),
    "# Tools",
    "Functions you may call, within <tools></tools>:",
    "To call one, answer with its name and arguments as JSON within <tool_call></tool_call>:",
    '{"name": <function-name>, "arguments": <args-json-object>}',
]


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words) + rng.choice([".", "?", ":", "()", " {}", ""]))
    for _ in range(lines // 2):
        keys = rng.sample(_JSON_WORDS, rng.randint(2, 5))
        value: Any = {k: rng.choice([rng.choice(_JSON_WORDS), rng.choice(_WORDS), rng.randint(0, 99)]) for k in keys}
        for key in rng.sample(keys, rng.randint(0, 2)):
            value = {key: value}
        out.append(json.dumps(value))
    return out + _TEMPLATE_LINES * 20


def _tokenizer(seed: int) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TOOL_TOKENS),  # room for the tool tags within VOCAB_SIZE
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _sentence_transformers_layout(out: Path, hidden_size: int) -> None:
    """modules.json and its pooling config, as a Sentence Transformers model has them: vLLM reads them to
    resolve `--runner auto` to pooling and to pick mean pooling with normalisation."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_mean_tokens": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    (out / "2_Normalize").mkdir()


def _never_write(model: Any, token_ids: list[int]) -> None:
    """Random weights may pick a token a detokenizer drops (`<pad>`, `<unk>`, `<s>`, a lone byte of a
    multi-byte character): a response of only those reads as empty. Hidden dimension 0 is made a constant
    (1 in every embedding, and no layer writes to it), so after the final norm it is always positive; the lm
    head reads it with a large negative weight for those tokens only and a zero weight for every other one.
    EOS keeps its chance."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        for token in token_ids:
            model.lm_head.weight[token, 0] = -10.0


def _write(out: Path, seed: int, embedding: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    fast = _tokenizer(seed)
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
    if embedding:
        # No LM head: "LlamaModel" is an architecture vLLM registers as an embedding model.
        LlamaModel(config).save_pretrained(out, safe_serialization=True)
        _sentence_transformers_layout(out, config.hidden_size)
    else:
        model = LlamaForCausalLM(config)
        # Special tokens but EOS, and the lone bytes of multi-byte characters: a detokenizer shows neither.
        unseen = [fast.unk_token_id, fast.bos_token_id, fast.pad_token_id]
        unseen += [i for i in range(len(fast)) if i not in unseen and i != fast.eos_token_id
                   and (not (text := fast.decode([i])) or "\ufffd" in text)]
        _never_write(model, unseen)
        model.save_pretrained(out, safe_serialization=True)
    marker = _recipe(seed, embedding) | {"version": GENERATOR_VERSION, "vocab_size": len(fast)}
    (out / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")


def _recipe(seed: int, embedding: bool) -> dict[str, Any]:
    return {"seed": seed, "kind": "embedding" if embedding else "generate"}


def _holds(directory: Path, seed: int, embedding: bool) -> bool:
    """Whether `directory` holds a complete model of this seed and kind; an error if it holds another one.

    An older generator's model of the same seed and kind is reused: cached paths carry GENERATOR_VERSION, and a
    directory named by hand is the caller's to rewrite with force."""
    try:
        found = json.loads((directory / MARKER).read_text())
    except FileNotFoundError:
        return False
    found.setdefault("kind", "generate")  # older markers recorded no kind: they only made generative models
    wanted = _recipe(seed, embedding)
    if {k: found.get(k) for k in wanted} != wanted:
        raise FileExistsError(f"{directory} holds another tiny model ({found}, not {wanted}); force rewrites it")
    return True


def make_tiny_model(directory: str | Path, seed: int = 0, *, force: bool = False, embedding: bool = False) -> Path:
    """Write the tiny model (the embedding one with `embedding`) into `directory`; idempotent, and safe when
    several processes race for it. Reuses a directory that already holds this recipe, refuses one that holds
    another, and rewrites either with `force`."""
    directory = Path(directory).expanduser().resolve()
    if not force and _holds(directory, seed, embedding):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Three tier replicas may start at once: one writes, the others wait on the lock and reuse it.
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _holds(directory, seed, embedding):
            return directory
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            _write(tmp, seed, embedding)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)  # atomic: readers never see a half-written model
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def cached_tiny_model(cache_dir: str | Path, seed: int, embedding: bool = False) -> Path:
    name = f"tiny-embed-v{GENERATOR_VERSION}-seed{seed}" if embedding else f"tiny-v{GENERATOR_VERSION}-seed{seed}"
    return make_tiny_model(Path(cache_dir) / "models" / name, seed, embedding=embedding)
