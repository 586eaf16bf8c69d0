"""/v1/chat/completions: messages through the chat template -> outputs -> OpenAI's chat.completion JSON or
its chunk events, with logprobs, echo and usage."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from plexus.entrypoints.openai.protocol import ChatCompletionRequest
from plexus.entrypoints.openai.serving_engine import OpenAIError, ServingBase, _message_dict
from plexus.entrypoints.openai.streams import last_output, merge, sse, usage


class ChatEndpoints(ServingBase):
    async def chat(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        lora = self.lora_for(request.model)
        if request.tool_choice not in (None, "none", "auto"):
            raise OpenAIError("tool_choice other than 'none' or 'auto' is not supported: plexus has no tool-call "
                              "parser", 400, "tool_choice")
        if request.top_logprobs is not None and request.top_logprobs < 0:
            raise OpenAIError(f"top_logprobs must be >= 0, got {request.top_logprobs}", 400, "top_logprobs")
        if request.top_logprobs and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", 400, "top_logprobs")
        text = self.render_chat(request.messages, request.add_generation_prompt, request.continue_final_message,
                                request.chat_template, request.chat_template_kwargs, request.tools)
        prompt = {"prompt_token_ids": self._encode(text, request.add_special_tokens), "prompt": text}
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        self._check_length(prompt["prompt_token_ids"], max_tokens, field)
        stream = bool(request.stream)
        params = self.sampling_params(request, max_tokens, (request.top_logprobs or 0) if request.logprobs else None,
                                      stream)
        request_id = f"chatcmpl-{request.request_id or uuid.uuid4().hex}"
        created = int(time.time())
        model = request.model or self.model_name
        echo = ""
        if request.echo and request.messages and request.messages[-1].role == self.response_role:
            echo = _message_dict(request.messages[-1], len(request.messages) - 1).get("content") or ""
        [started] = await self._start_all([(request_id, prompt, params, lora, request.priority)])
        if stream:
            return self._chat_stream(request, request_id, created, model, prompt, started, echo)
        final = await last_output(*started)
        choices = []
        completion_tokens = 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if c.logprobs is not None:
                logprobs = {"content": self._chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs or 0)}
            choices.append({"index": c.index, "message": {"role": self.response_role, "content": echo + c.text,
                                                           "refusal": None, "annotations": None, "audio": None,
                                                           "function_call": None, "tool_calls": [],
                                                           "reasoning_content": None},
                            "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "service_tier": None, "system_fingerprint": None, "prompt_logprobs": None,
                "kv_transfer_params": None, "usage": usage(len(final.prompt_token_ids), completion_tokens)}

    async def _chat_stream(self, request: ChatCompletionRequest, request_id: str, created: int, model: str,
                           prompt: dict, started: tuple, echo: str) -> AsyncIterator[str]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        prompt_tokens = len(prompt["prompt_token_ids"])
        completion_tokens = 0

        def chunk(choices: list) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices}

        for i in range(request.n):
            yield sse(chunk([{"index": i, "delta": {"role": self.response_role, "content": ""},
                               "logprobs": None, "finish_reason": None}]))
            if echo:
                yield sse(chunk([{"index": i, "delta": {"content": echo}, "logprobs": None,
                                   "finish_reason": None}]))
        async for _, output in merge([started]):
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                if not c.text and not c.token_ids and c.finish_reason is None:
                    continue
                logprobs = None
                if c.logprobs is not None:
                    logprobs = {"content": self._chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs or 0)}
                delta = {"content": c.text} if c.text or c.finish_reason is None else {}
                body = chunk([{"index": c.index, "delta": delta, "logprobs": logprobs,
                               "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
                if include_usage and continuous:
                    body["usage"] = usage(prompt_tokens, completion_tokens)
                yield sse(body)
        if include_usage:
            yield sse({**chunk([]), "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, token_ids: list[int], logprobs: list, top: int) -> list[dict]:
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            chosen = entry.get(token_id)
            text = self._token_text(token_id, chosen)
            tops = []
            ranked = sorted((kv for kv in entry.items() if kv[1].rank is not None and kv[1].rank <= top),
                            key=lambda kv: kv[1].rank)
            for tid, lp in ranked[:top]:
                t = self._token_text(tid, lp)
                tops.append({"token": t, "logprob": max(lp.logprob, -9999.0), "bytes": list(t.encode("utf-8"))})
            content.append({"token": text, "logprob": max(chosen.logprob, -9999.0) if chosen else None,
                            "bytes": list(text.encode("utf-8")), "top_logprobs": tops})
        return content
