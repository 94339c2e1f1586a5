"""vLLM's chat serving with a cheaper stream for the common case (issue 9: the gateway must cost ~nothing).

vLLM's `chat_completion_stream_generator` builds three pydantic models per token (the chunk, its choice,
the delta), each run through a Python wrap validator, and serializes them with `model_dump_json`: in
py-spy that was 44 % of a tier replica's busy time under streaming load. A *plain* stream (one choice, no
tool or reasoning parser, no logprobs, echo, token ids, continuous usage or per-request metrics) needs none
of that machinery: here it is written with orjson straight from the engine's outputs, byte for byte in
vLLM's own format (tests/e2e/test_chatstream.py compares it with bare vLLM). Everything else, and all of
the request handling before the stream (rendering, sampling parameters, the engine call), stays vLLM's.

Imported only inside a tier replica (it imports vLLM).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.serve.engine.protocol import UsageInfo
from vllm.exceptions import GenerationError
from vllm.outputs import RequestOutput

log = logging.getLogger(__name__)


def _sse(chunk: dict[str, Any]) -> str:
    return "data: " + orjson.dumps(chunk).decode() + "\n\n"


class StreamingChat(OpenAIServingChat):
    def plain(self, request: ChatCompletionRequest) -> bool:
        """True when vLLM's stream generator would take none of its optional branches for this request."""
        options = request.stream_options
        return (
            self.parser_cls is None
            and (request.n or 1) == 1
            and not request.use_beam_search
            and not request.logprobs
            and not request.echo
            and not request.return_token_ids
            and not request.return_prompt_text
            and not (options is not None and options.continuous_usage_stats)
            and not self.enable_force_include_usage
            and not self.enable_log_outputs
            and not self.enable_per_request_metrics
            and not self.enable_prompt_tokens_details
            and self.engine_client.vllm_config.speculative_config is None
        )

    async def chat_completion_stream_generator(  # type: ignore[override]
        self,
        request: ChatCompletionRequest,
        result_generator: AsyncIterator[RequestOutput],
        request_id: str,
        model_name: str,
        conversation: list[Any],
        tokenizer: Any,
        request_metadata: Any,
        **kwargs: Any,
    ) -> AsyncGenerator[str, None]:
        if not self.plain(request):
            async for line in super().chat_completion_stream_generator(
                request, result_generator, request_id, model_name, conversation, tokenizer, request_metadata,
                **kwargs,
            ):  # fmt: skip
                yield line
            return
        async for line in self._plain_stream(request, result_generator, request_id, model_name, request_metadata):
            yield line

    async def _plain_stream(
        self,
        request: ChatCompletionRequest,
        result_generator: AsyncIterator[RequestOutput],
        request_id: str,
        model_name: str,
        request_metadata: Any,
    ) -> AsyncGenerator[str, None]:
        # Keys in vLLM's order, and exactly the fields its `model_dump_json(exclude_unset=True)` writes.
        head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        prompt_tokens = completion_tokens = 0
        first = True
        finished = False
        try:
            async for res in result_generator:
                if res.prompt_token_ids is not None:
                    prompt_tokens = len(res.prompt_token_ids) + len(res.encoder_prompt_token_ids or ())
                if first:
                    first = False
                    role = self.get_chat_request_role(request)
                    delta = {"role": role, "content": ""}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield _sse({**head, "choices": [choice], "prompt_token_ids": None, "prompt_text": None})
                for output in res.outputs:
                    if finished:
                        continue
                    self._raise_if_error(output.finish_reason, request_id)
                    if not output.text and not output.token_ids and not completion_tokens:
                        continue
                    completion_tokens += len(output.token_ids)
                    choice = {"index": output.index, "delta": {"content": output.text}, "logprobs": None}
                    chunk = {**head, "choices": [choice]}
                    if output.finish_reason is None:
                        choice.update(finish_reason=None, token_ids=None)
                    else:
                        finished = True
                        reason, stop = output.finish_reason, output.stop_reason
                        choice.update(finish_reason=reason, stop_reason=stop, token_ids=None)
                        if not include_usage and self.system_fingerprint is not None:
                            chunk["system_fingerprint"] = self.system_fingerprint
                    yield _sse(chunk)
            usage = {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
            }
            if include_usage:
                last = {**head, "choices": [], "usage": usage}
                if self.system_fingerprint is not None:
                    last["system_fingerprint"] = self.system_fingerprint
                yield _sse(last)
            request_metadata.final_usage_info = UsageInfo(**usage)
        except GenerationError as exc:
            yield f"data: {self._convert_generation_error_to_streaming_response(exc)}\n\n"
        except Exception as exc:
            log.exception("chat stream failed")
            yield f"data: {self.create_streaming_error_response(exc)}\n\n"
        yield "data: [DONE]\n\n"
