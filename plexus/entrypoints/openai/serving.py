"""The OpenAI endpoints' logic: a request body -> prompts and SamplingParams -> AsyncLLM -> vLLM's JSON
(whole, or as server-sent events). Everything a request can get wrong is found before it reaches the engine
and raised as an OpenAIError with the status and the field it names."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from plexus.core.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from plexus.core.lora.request import LoRARequest
from plexus.core.outputs import RequestOutput
from plexus.core.sampling_params import RequestOutputKind, SamplingParams, generation_defaults
from plexus.entrypoints.openai.protocol import (
    ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, LoadLoRAAdapterRequest,
    SamplingFields, TokenizeRequest, UnloadLoRAAdapterRequest)

logger = logging.getLogger("plexus")



class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLargeError",
             422: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param)


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": OpenAIError.TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


@dataclass
class LoRAModule:
    """vLLM's --lora-modules entry: name=path, or JSON {"name", "path", "base_model_name"}."""
    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> LoRAModule:
        text = text.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
                return cls(name=spec["name"], path=spec["path"], base_model_name=spec.get("base_model_name"))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {text!r}: expected JSON with \"name\" and \"path\" ({e})") from None
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {text!r}: expected name=path or JSON {{\"name\": ..., \"path\": ...}}")
        return cls(name=name, path=path)


class OpenAIServing:
    """The endpoints of one served model (and its LoRA modules), over one AsyncLLM."""

    def __init__(self, engine: AsyncLLM, served_model_names: list[str], lora_modules: list[LoRAModule] = (),
                 chat_template: str | None = None, response_role: str = "assistant",
                 return_tokens_as_token_ids: bool = False, log_requests: bool = False) -> None:
        self.engine = engine
        self.llm_engine = engine.engine
        self.config = self.llm_engine.config
        self.tokenizer = self.llm_engine.get_tokenizer()
        self.served_model_names = served_model_names
        self.model_name = served_model_names[0]
        self.max_model_len = self.config.model.max_model_len
        self.chat_template = chat_template
        self.response_role = response_role
        self.return_tokens_as_token_ids = return_tokens_as_token_ids
        self.log_requests = log_requests
        self.created = int(time.time())
        self.loras: dict[str, LoRARequest] = {}
        for module in lora_modules:
            self.loras[module.name] = LoRARequest(module.name, lora_path=module.path,
                                                  base_model_name=module.base_model_name)
        # A field the request leaves out: the model's generation_config.json, else SamplingParams' default.
        self.defaults = generation_defaults(self.config.model.generation_config, SamplingParams())

    async def start(self) -> None:
        """Read and check the --lora-modules adapters once, at startup."""
        for lora in self.loras.values():
            await self.engine.add_lora(lora)

    # ------------------------------------------------------------------ models and adapters

    def lora_for(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` selects: None for the base model; 404 for a name not served."""
        if not model or model in self.served_model_names:
            return None
        if model in self.loras:
            return self.loras[model]
        raise OpenAIError(f"The model `{model}` does not exist.", 404, "model")

    def models(self) -> dict:
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "plexus",
                  "root": str(self.config.model.model_dir), "parent": None, "max_model_len": self.max_model_len}
                 for name in self.served_model_names]
        cards += [{"id": name, "object": "model", "created": self.created, "owned_by": "plexus",
                   "root": lora.lora_path, "parent": lora.base_model_name or self.model_name, "max_model_len": None}
                  for name, lora in self.loras.items()]
        return {"object": "list", "data": cards}

    async def load_lora_adapter(self, request: LoadLoRAAdapterRequest) -> str:
        if self.config.lora is None:
            raise OpenAIError("LoRA is not enabled; start the server with --enable-lora", 400, "lora_name")
        if request.lora_name in self.loras:
            raise OpenAIError(f"The lora adapter '{request.lora_name}' has already been loaded.", 400, "lora_name")
        if request.lora_name in self.served_model_names:
            raise OpenAIError(f"'{request.lora_name}' is the base model's name", 400, "lora_name")
        try:
            lora = LoRARequest(request.lora_name, lora_path=request.lora_path)
            await self.engine.add_lora(lora)
        except (ValueError, TypeError, OSError) as e:
            raise OpenAIError(str(e), 400, "lora_path") from None
        self.loras[request.lora_name] = lora
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    async def unload_lora_adapter(self, request: UnloadLoRAAdapterRequest) -> str:
        lora = self.loras.get(request.lora_name)
        if lora is None:
            raise OpenAIError(f"The lora adapter '{request.lora_name}' cannot be found.", 404, "lora_name")
        await self.engine.remove_lora(lora.lora_int_id)
        del self.loras[request.lora_name]
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."

    # ------------------------------------------------------------------ tokenize

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool,
                    chat_template: str | None, chat_template_kwargs: dict | None, tools: list | None = None) -> str:
        if self.tokenizer is None:
            raise OpenAIError("chat needs a tokenizer, but the server runs with --skip-tokenizer-init", 400)
        if add_generation_prompt and continue_final_message:
            raise OpenAIError("add_generation_prompt and continue_final_message cannot both be true", 400,
                              "continue_final_message")
        conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
        if not conversation:
            raise OpenAIError("messages must hold at least one message", 400, "messages")
        kwargs = dict(chat_template_kwargs or {})
        for key in ("tokenize", "add_generation_prompt", "continue_final_message", "chat_template", "tools"):
            kwargs.pop(key, None)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools,
                chat_template=chat_template or self.chat_template, **kwargs)
        except Exception as e:  # noqa: BLE001  (a template error is the request's: jinja raises many kinds)
            raise OpenAIError(f"the chat template failed on these messages: {type(e).__name__}: {e}", 400,
                              "messages") from None

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise OpenAIError("text prompts need a tokenizer, but the server runs with --skip-tokenizer-init; send "
                              "token ids", 400, "prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def tokenize(self, request: TokenizeRequest) -> dict:
        self.lora_for(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("give either prompt or messages", 400, "prompt")
        if request.messages is not None:
            text = self.render_chat(request.messages, request.add_generation_prompt, request.continue_final_message,
                                    request.chat_template, request.chat_template_kwargs)
            ids = self._encode(text, bool(request.add_special_tokens))
        else:
            ids = self._encode(request.prompt, True if request.add_special_tokens is None
                               else request.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, request: DetokenizeRequest) -> dict:
        self.lora_for(request.model)
        if self.tokenizer is None:
            raise OpenAIError("detokenize needs a tokenizer", 400)
        vocab = self.config.model.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(f"token id {bad} is out of vocabulary: ids must be in [0, {vocab})", 400, "tokens")
        return {"prompt": self.tokenizer.decode(request.tokens)}

    # ------------------------------------------------------------------ sampling

    def sampling_params(self, request: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        stream: bool) -> SamplingParams:
        """SamplingParams of a request body; a bad value is a 400 naming the field."""
        if request.use_beam_search:
            raise OpenAIError("use_beam_search is not supported by the server; use LLM.beam_search offline", 400,
                              "use_beam_search")
        if request.truncate_prompt_tokens is not None:
            raise OpenAIError("truncate_prompt_tokens is not supported: plexus never truncates prompts", 400,
                              "truncate_prompt_tokens")
        if request.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise OpenAIError(f"guided_decoding_backend={request.guided_decoding_backend!r} is not supported; "
                              "plexus's structured outputs run on xgrammar ('auto' or 'xgrammar')", 400,
                              "guided_decoding_backend")

        def pick(name: str) -> Any:
            value = getattr(request, name)
            return self.defaults[name] if value is None else value

        fields = dict(
            n=request.n, best_of=request.best_of,
            presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty"), temperature=pick("temperature"), top_p=pick("top_p"),
            top_k=pick("top_k"), min_p=pick("min_p"), seed=request.seed, stop=request.stop,
            stop_token_ids=request.stop_token_ids, bad_words=request.bad_words,
            include_stop_str_in_output=request.include_stop_str_in_output, ignore_eos=request.ignore_eos,
            max_tokens=max_tokens, min_tokens=request.min_tokens, logprobs=logprobs,
            prompt_logprobs=request.prompt_logprobs, skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            logit_bias=request.logit_bias, allowed_token_ids=request.allowed_token_ids,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        structured = self._structured_outputs(request)
        if structured is not None:
            fields["structured_outputs"] = structured
        try:
            return SamplingParams(**fields)
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), 400, _field_named_in(str(e), fields)) from None

    def _structured_outputs(self, request: SamplingFields):
        """vLLM's three spellings of a constraint: structured_outputs, guided_*, response_format."""
        kinds: dict[str, Any] = {}
        options: dict[str, Any] = {}
        if request.structured_outputs is not None:
            given = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
            for key in ("json", "regex", "choice", "grammar", "json_object"):
                if given.get(key) not in (None, False):
                    kinds[key] = given.pop(key)
                given.pop(key, None)
            options = given
        for key, value in (("json", request.guided_json), ("regex", request.guided_regex),
                           ("choice", request.guided_choice), ("grammar", request.guided_grammar)):
            if value is not None:
                kinds[key] = value
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                kinds["json_object"] = True
            else:
                schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
                if schema is None:
                    raise OpenAIError("response_format json_schema needs json_schema.schema", 400,
                                      "response_format")
                kinds["json"] = schema
        if not kinds:
            return None
        if len(kinds) > 1:
            raise OpenAIError(f"only one kind of structured output may be given; got {', '.join(sorted(kinds))}",
                              400, "response_format" if fmt is not None else "structured_outputs")
        from plexus.core.sampling_params import StructuredOutputsParams

        if request.guided_whitespace_pattern is not None:
            options["whitespace_pattern"] = request.guided_whitespace_pattern
        try:
            return StructuredOutputsParams(**kinds, **options)
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), 400, "structured_outputs") from None

    # ------------------------------------------------------------------ generation

    async def _start(self, request_id: str, prompt: dict, params: SamplingParams, lora: LoRARequest | None,
                     priority: int) -> tuple[RequestOutput | None, AsyncIterator[RequestOutput]]:
        """Queue one prompt and wait for its first output; what the engine refuses becomes a 400 or 503."""
        if self.log_requests:
            logger.info("Received request %s: %d prompt tokens, params: %r, lora: %s", request_id,
                        len(prompt.get("prompt_token_ids") or ()), params, lora and lora.lora_name)
        stream = self.engine.generate(prompt, params, request_id, lora_request=lora, priority=priority)
        try:
            return await _first(stream), stream
        except (QueueFullError, EngineDeadError) as e:
            raise OpenAIError(str(e), 503) from None
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), 400, _field_named_in(str(e), _REQUEST_FIELDS)) from None

    async def _start_all(self, jobs: list[tuple]) -> list[tuple[RequestOutput | None, AsyncIterator]]:
        """Queue every prompt of a request at once (they batch together); if one is refused, the others are
        aborted and the refusal is the answer."""
        tasks = [asyncio.ensure_future(self._start(*job)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                if not task.done():
                    task.cancel()
                elif not task.cancelled() and task.exception() is None:
                    await task.result()[1].aclose()
            raise

    def _prompts(self, request: CompletionRequest) -> list[dict]:
        prompt = request.prompt
        if prompt is None or prompt == [] or prompt == "":
            raise OpenAIError("prompt must be a non-empty string, list of strings, or list of token ids", 400, "prompt")
        if isinstance(prompt, str):
            items: list = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append({"prompt_token_ids": self._encode(item, request.add_special_tokens), "prompt": item})
            else:
                if not item:
                    raise OpenAIError("a token-id prompt must not be empty", 400, "prompt")
                prompts.append({"prompt_token_ids": list(item)})
        return prompts

    def _check_length(self, prompt_ids: list[int], max_tokens: int | None, field: str) -> None:
        if len(prompt_ids) >= self.max_model_len:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                              f"request has {len(prompt_ids)} input tokens. Please reduce the length of the input.",
                              400, "messages" if field == "max_completion_tokens" else "prompt")
        if max_tokens is not None and len(prompt_ids) + max_tokens > self.max_model_len:
            raise OpenAIError(f"'{field}' is too large: {max_tokens}. This model's maximum context length is "
                              f"{self.max_model_len} tokens and your request has {len(prompt_ids)} input tokens "
                              f"({max_tokens} > {self.max_model_len} - {len(prompt_ids)}).", 400, field)

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
        finals = await asyncio.gather(*(_last(first, s) for first, s in started))
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
                "usage": _usage(prompt_tokens, completion_tokens)}

    async def _completion_stream(self, request: CompletionRequest, request_id: str, created: int, model: str,
                                 prompts: list[dict], started: list) -> AsyncIterator[str]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        completion_tokens = 0
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        async for i, output in _merge(started):
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
                    chunk["usage"] = _usage(prompt_tokens, completion_tokens)
                yield _sse(chunk)
        if include_usage:
            yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    def _piece(self, c, prompt: dict, output: RequestOutput, echo: bool) -> tuple[str, list[int], list | None]:
        """A completion's text, token ids and logprobs; with echo, the prompt's in front (its first token has
        no logprob)."""
        text, tokens = c.text, list(c.token_ids)
        lps = list(c.logprobs) if c.logprobs is not None else None
        if echo:
            prompt_text = prompt.get("prompt")
            text = (prompt_text if prompt_text is not None else self.tokenizer.decode(prompt["prompt_token_ids"])) + text
            if lps is not None:
                tokens = list(output.prompt_token_ids) + tokens
                lps = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + lps
        return text, tokens, lps

    def _token_text(self, token_id: int, logprob) -> str:
        if self.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

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

    # ------------------------------------------------------------------ chat

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
        final = await _last(*started)
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
                "kv_transfer_params": None, "usage": _usage(len(final.prompt_token_ids), completion_tokens)}

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
            yield _sse(chunk([{"index": i, "delta": {"role": self.response_role, "content": ""},
                               "logprobs": None, "finish_reason": None}]))
            if echo:
                yield _sse(chunk([{"index": i, "delta": {"content": echo}, "logprobs": None,
                                   "finish_reason": None}]))
        async for _, output in _merge([started]):
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
                    body["usage"] = _usage(prompt_tokens, completion_tokens)
                yield _sse(body)
        if include_usage:
            yield _sse({**chunk([]), "usage": _usage(prompt_tokens, completion_tokens)})
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


def _message_dict(message: ChatMessage, index: int) -> dict:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise OpenAIError(f"messages[{index}].content: content parts of type {kind!r} are not supported; "
                                  "this server takes text parts only", 400, f"messages[{index}].content")
        content = "\n".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        value = getattr(message, key)
        if value is not None:
            out[key] = value
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _first(stream) -> RequestOutput | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _last(first: RequestOutput | None, stream) -> RequestOutput | None:
    final = first
    async for output in stream:
        final = output
    return final


async def _merge(started: list[tuple]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests' streams as they come; leaving early (a client that went
    away) closes every stream, which aborts its request."""
    if len(started) == 1:
        first, stream = started[0]
        try:
            if first is not None:
                yield 0, first
            async for output in stream:
                yield 0, output
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, first, stream) -> None:
        try:
            if first is not None:
                await queue.put((i, first))
            async for output in stream:
                await queue.put((i, output))
        finally:
            await stream.aclose()
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, first, stream)) for i, (first, stream) in enumerate(started)]
    try:
        remaining = len(tasks)
        while remaining:
            i, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            yield i, output
        for task in tasks:
            task.result()         # a stream that failed mid-way raises here
    finally:
        for task in tasks:
            task.cancel()


_REQUEST_FIELDS = {f.name: None for f in dataclasses.fields(SamplingParams)} | {"prompt": None, "messages": None}


def _field_named_in(message: str, fields: dict) -> str | None:
    """The request field an error message is about, when it names one (for the error's `param`)."""
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(name) or f" {name}" in message or f"{name}=" in message:
            return name
    return None
