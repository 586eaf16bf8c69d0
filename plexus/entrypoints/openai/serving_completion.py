"""/v1/completions: prompts (text or token ids, one or many) -> outputs -> OpenAI's text_completion JSON or
its server-sent events, with legacy logprobs and echo."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from plexus.core.outputs import RequestOutput
from plexus.entrypoints.openai.protocol import CompletionRequest
from plexus.entrypoints.openai.serving_engine import OpenAIError, ServingBase
from plexus.entrypoints.openai.streams import last_output, merge, sse, usage


class CompletionEndpoints(ServingBase):
    async def completion(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        lora = self.lora_for(request.model)
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported", 400, "suffix")
        if request.logprobs is not None and request.logprobs < 0:
            raise OpenAIError(f"logprobs must be >= 0, got {request.logprobs}", 400, "logprobs")
        prompts = self._prompts(request)
        stream = bool(request.stream)
        params = self.sampling_params(request, request.max_tokens, request.logprobs, stream)
        if request.echo and request.logprobs is not None:
            params.prompt_logprobs = request.logprobs
        for p in prompts:
            self._check_length(p["prompt_token_ids"], params.max_tokens, "max_tokens")
        request_id = f"cmpl-{request.request_id or uuid.uuid4().hex}"
        created = int(time.time())
        model = request.model or self.model_name
        started = await self._start_all([(f"{request_id}-{i}", p, params, lora, request.priority)
                                         for i, p in enumerate(prompts)])    # errors before the first event: 4xx
        if stream:
            return self._completion_stream(request, request_id, created, model, prompts, started)
        finals = await asyncio.gather(*(last_output(first, s) for first, s in started))
        choices = []
        prompt_tokens = completion_tokens = 0
        for i, (prompt, output) in enumerate(zip(prompts, finals)):
            prompt_tokens += len(output.prompt_token_ids)
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                logprobs = None
                text, tokens, lps = self._piece(c, prompt, output, echo=bool(request.echo))
                if lps is not None:
                    logprobs = self._completion_logprobs(tokens, lps, request.logprobs, 0)
                choices.append({"index": i * request.n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                "prompt_logprobs": None})
        return {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "system_fingerprint": None, "service_tier": None, "kv_transfer_params": None,
                "usage": usage(prompt_tokens, completion_tokens)}

    async def _completion_stream(self, request: CompletionRequest, request_id: str, created: int, model: str,
                                 prompts: list[dict], started: list) -> AsyncIterator[str]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        completion_tokens = 0
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        async for i, output in merge(started):
            prompt = prompts[i]
            for c in output.outputs:
                index = i * request.n + c.index
                text, tokens, lps = self._piece(c, prompt, output, echo=bool(request.echo) and index not in echoed)
                echoed.add(index)
                completion_tokens += len(c.token_ids)
                if not text and not tokens and c.finish_reason is None:
                    continue
                logprobs = None
                if lps is not None:
                    logprobs = self._completion_logprobs(tokens, lps, request.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
                chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
                if include_usage and continuous:
                    chunk["usage"] = usage(prompt_tokens, completion_tokens)
                yield sse(chunk)
        if include_usage:
            yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    def _piece(self, c, prompt: dict, output: RequestOutput, echo: bool) -> tuple[str, list[int], list | None]:
        """A completion's text, token ids and logprobs; with echo, the prompt's in front (its first token has
        no logprob)."""
        text, tokens = c.text, list(c.token_ids)
        lps = list(c.logprobs) if c.logprobs is not None else None
        if echo:
            prompt_text = prompt.get("prompt")
            if prompt_text is None:
                prompt_text = self.tokenizer.decode(prompt["prompt_token_ids"])
            text = prompt_text + text
            if lps is not None:
                tokens = list(output.prompt_token_ids) + tokens
                lps = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + lps
        return text, tokens, lps

    def _completion_logprobs(self, token_ids: list[int], logprobs: list, num: int | None, offset: int) -> dict:
        """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for token_id, entry in zip(token_ids, logprobs):
            if entry is None:         # the first prompt token has no logprob
                text = self._token_text(token_id, None)
                out["tokens"].append(text)
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                chosen = entry.get(token_id)
                text = self._token_text(token_id, chosen)
                out["tokens"].append(text)
                out["token_logprobs"].append(max(chosen.logprob, -9999.0) if chosen else None)
                top = {}
                for tid, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[: (num or 0) + 1]:
                    top[self._token_text(tid, lp)] = max(lp.logprob, -9999.0)
                out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out
