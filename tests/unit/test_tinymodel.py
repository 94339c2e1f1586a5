"""The tiny model generator: deterministic, complete, Hugging Face format, with a chat template that carries an
OpenAI-style tool loop in the hermes format, and an embedding variant that vLLM serves on /v1/embeddings."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serving.backends.tinymodel import (
    GENERATOR_VERSION,
    MARKER,
    TOOL_TOKENS,
    VOCAB_SIZE,
    cached_tiny_model,
    make_tiny_model,
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
RENDERED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=1)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def last_json(stdout: str) -> Any:
    """The child's result: the last JSON line of its stdout, where vLLM's own logs go too."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def render(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=5)
    b = make_tiny_model(tmp_path / "b", seed=5)
    c = make_tiny_model(tmp_path / "c", seed=6)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= set(digest(a))
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    marker = json.loads((a / MARKER).read_text())
    assert marker == {"seed": 5, "kind": "generate", "version": GENERATOR_VERSION, "vocab_size": config["vocab_size"]}


def test_tokenizer_and_chat_template_work(tok: Any) -> None:
    assert len(tok) <= VOCAB_SIZE  # the fit check's recipe is an upper bound
    ids = tok.encode("def add(a, b): return a + b")
    assert tok.decode(ids, skip_special_tokens=True) == "def add(a, b): return a + b"
    prompt = render(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                    add_generation_prompt=True)
    assert prompt == "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert render(tok, [{"role": "user", "content": "hi"}]) == "<s><|user|>\nhi\n"


def test_tool_tags_are_single_tokens_that_survive_skipping_special_tokens(tok: Any) -> None:
    for tag in TOOL_TOKENS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    ids = tok.encode(RENDERED_CALL, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == RENDERED_CALL


def test_tools_are_listed_in_the_system_turn(tok: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather in Paris?"}]
    prompt = render(tok, messages, tools=TOOLS, add_generation_prompt=True)
    # The caller's system prompt opens the one system turn, then the tools, one JSON object a line.
    assert prompt.startswith("<s><|system|>\nbe brief\n\n# Tools\n")
    assert prompt.count("<|system|>") == 1
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in prompt
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n' in prompt
    assert prompt.endswith("\n<|user|>\nweather in Paris?\n<|assistant|>\n")
    # Without a system prompt the tools still get a system turn of their own.
    alone = render(tok, messages[1:], tools=TOOLS)
    assert alone.startswith("<s><|system|>\n# Tools\n") and alone.endswith("<|user|>\nweather in Paris?\n")


@pytest.mark.parametrize("arguments", [{"city": "Paris"}, '{"city": "Paris"}'], ids=["dict", "json-string"])
def test_an_assistant_tool_call_renders_in_hermes_format(tok: Any, arguments: Any) -> None:
    call = {**CALL, "function": {"name": "get_weather", "arguments": arguments}}
    prompt = render(tok, [{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert prompt == f"<s><|assistant|>\n{RENDERED_CALL}\n"
    # Text before the calls, several calls, and a missing content key.
    second = {**CALL, "function": {"name": "get_time", "arguments": {}}}
    prompt = render(tok, [{"role": "assistant", "content": "let me see", "tool_calls": [call, second]}])
    assert prompt == (f"<s><|assistant|>\nlet me see\n{RENDERED_CALL}\n"
                      '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')
    assert render(tok, [{"role": "assistant", "tool_calls": [call]}]) == f"<s><|assistant|>\n{RENDERED_CALL}\n"


def test_tool_results_render_as_responses_in_one_user_turn(tok: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
    ]
    prompt = render(tok, messages, tools=TOOLS, add_generation_prompt=True)
    assert prompt.endswith(f"{RENDERED_CALL}\n{RENDERED_CALL}\n<|user|>\n<tool_response>\nsunny\n</tool_response>\n"
                           "<tool_response>\nrain\n</tool_response>\n<|assistant|>\n")


def test_none_and_list_content(tok: Any) -> None:
    parts = [{"type": "text", "text": "weather "}, {"type": "text", "text": "in Paris?"}]
    messages: list[dict[str, Any]] = [{"role": "system", "content": None}, {"role": "user", "content": parts},
                                      {"role": "tool", "content": None}]
    assert render(tok, messages) == (
        "<s><|system|>\n\n<|user|>\nweather in Paris?\n<|user|>\n<tool_response>\n\n</tool_response>\n")


def test_vllm_reads_the_template_and_parses_its_tool_calls_with_the_hermes_parser(model_dir: Path) -> None:
    # In a child: importing vLLM costs seconds and torch, and most tests don't need it. The model's output is
    # what the template renders for an assistant call, detokenized as vLLM does by default (skipping special
    # tokens): the parser must read back exactly the calls the template writes.
    code = f"""
import json
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.renderers.hf import _detect_content_format
from vllm.tokenizers import get_tokenizer
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

tok = get_tokenizer({str(model_dir)!r})
call = {CALL!r}
turn = {{"role": "assistant", "content": None, "tool_calls": [call, call]}}
rendered = tok.apply_chat_template([turn], tokenize=False)
output = tok.decode(tok.encode(rendered.split("<|assistant|>\\n", 1)[1], add_special_tokens=False),
                    skip_special_tokens=True)
request = ChatCompletionRequest(model="tiny", messages=[{{"role": "user", "content": "hi"}}], tools={TOOLS!r})
info = Hermes2ProToolParser(tok).extract_tool_calls(output, request)
print(json.dumps({{"called": info.tools_called, "content": info.content,
                  "calls": [[c.function.name, json.loads(c.function.arguments)] for c in info.tool_calls],
                  "format": _detect_content_format(tok.chat_template, default="openai")}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = last_json(out.stdout)
    assert result["called"] is True and result["content"] in (None, "")
    assert result["calls"] == [["get_weather", {"city": "Paris"}]] * 2
    # vLLM walks the template to choose how to pass content; one it cannot walk falls back to the default.
    assert result["format"] == "string"


def test_vllms_reasoning_parser_accepts_the_tokenizer_and_splits_thinking_from_the_answer(model_dir: Path) -> None:
    code = f"""
import json
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.reasoning import ReasoningParserManager
from vllm.tokenizers import get_tokenizer

tok = get_tokenizer({str(model_dir)!r})
parser = ReasoningParserManager.get_reasoning_parser("deepseek_r1")(tok)
request = ChatCompletionRequest(model="tiny", messages=[{{"role": "user", "content": "hi"}}])
print(json.dumps({{"split": [parser.extract_reasoning("weigh it</think>yes", request),
                            parser.extract_reasoning("still thinking", request)]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert last_json(out.stdout)["split"] == [["weigh it", "yes"], ["still thinking", None]]


def test_existing_model_is_reused_not_rewritten(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", seed=1)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    make_tiny_model(tmp_path / "m", seed=1)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_directory_holding_another_model_is_refused_unless_forced(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", seed=1)
    with pytest.raises(FileExistsError, match="another tiny model"):
        make_tiny_model(path, seed=2)
    with pytest.raises(FileExistsError, match="another tiny model"):
        make_tiny_model(path, seed=1, embedding=True)
    make_tiny_model(path, seed=1, embedding=True, force=True)
    assert json.loads((path / MARKER).read_text())["kind"] == "embedding"
    # A marker of an older generator (seed only) is a generative model of that seed: reused, not rewritten.
    (path / MARKER).write_text(json.dumps({"seed": 1, "vocab_size": 512}))
    with pytest.raises(FileExistsError):
        make_tiny_model(path, seed=1, embedding=True)
    assert make_tiny_model(path, seed=1) == path


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_tiny_model(tmp_path_factory.mktemp("cache"), 1, embedding=True)


def test_embedding_model_is_a_sentence_transformers_llama(embed_dir: Path, model_dir: Path) -> None:
    assert embed_dir.name == f"tiny-embed-v{GENERATOR_VERSION}-seed1"
    assert embed_dir != cached_tiny_model(embed_dir.parents[1], 1)  # the generative model has its own path
    config = json.loads((embed_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaModel"]
    modules = json.loads((embed_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((embed_dir / "1_Pooling" / "config.json").read_text())
    assert pooling == {"word_embedding_dimension": config["hidden_size"], "pooling_mode_mean_tokens": True}
    # The same tokenizer as the generative model of the seed, chat template included.
    assert (embed_dir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_embedding_model_loads_and_is_deterministic_for_a_seed(embed_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    again = make_tiny_model(tmp_path / "again", seed=1, embedding=True)
    other = make_tiny_model(tmp_path / "other", seed=2, embedding=True)
    assert digest(again) == digest(embed_dir)
    assert digest(other)["model.safetensors"] != digest(embed_dir)["model.safetensors"]

    tok = AutoTokenizer.from_pretrained(embed_dir)
    batch = tok(["hello world", "def add(a, b): return a + b"], return_tensors="pt", padding=True)
    vectors = []
    for directory in (embed_dir, again):
        model = AutoModel.from_pretrained(directory)
        assert type(model).__name__ == "LlamaModel"
        with torch.no_grad():
            vectors.append(model(**batch).last_hidden_state)
    assert vectors[0].shape[:2] == batch["input_ids"].shape and vectors[0].shape[2] == 128
    assert torch.equal(vectors[0], vectors[1]) and not torch.equal(vectors[0][0], vectors[0][1])


def test_vllm_embeds_with_the_embedding_model(embed_dir: Path) -> None:  # a vLLM engine in a child: 20-40 s
    # No runner or convert arguments: vLLM resolves both from the model (modules.json and "LlamaModel").
    code = f"""
import json, os
from vllm import LLM

if __name__ == "__main__":
    llm = LLM(model={str(embed_dir)!r}, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    outs = llm.embed(["hello world", "def add(a, b): return a + b", "hello world"])
    e = [o.outputs.embedding for o in outs]
    print(json.dumps({{"dim": len(e[0]), "norms": [sum(x * x for x in v) for v in e],
                      "same": e[0] == e[2], "differ": e[0] != e[1]}}), flush=True)
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)  # past the engine's shutdown, interpreter teardown has nothing left to do but can abort
"""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = last_json(out.stdout)
    assert result["dim"] == 128 and result["same"] and result["differ"]
    assert all(abs(n - 1) < 1e-4 for n in result["norms"])  # normalised, as modules.json says


def test_cli_writes_the_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "make-tiny-model", str(tmp_path / "cli"), "--seed", "5"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == str(tmp_path / "cli")
    assert digest(tmp_path / "cli") == digest(make_tiny_model(tmp_path / "ref", seed=5))


def test_cli_writes_the_embedding_model_and_refuses_to_mix_them(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "serving.cli", "make-tiny-model", str(tmp_path / "cli"), "--seed", "5"]
    out = subprocess.run([*cmd, "--embedding"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "cli")
    assert digest(tmp_path / "cli") == digest(make_tiny_model(tmp_path / "ref", seed=5, embedding=True))
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 1 and "another tiny model" in refused.stderr and "--force" in refused.stderr
