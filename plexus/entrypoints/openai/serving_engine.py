"""The OpenAI endpoints' shared logic: a request body -> prompts and SamplingParams -> AsyncLLM; the completion
and chat endpoints (serving_completion.py, serving_chat.py) turn the outputs into vLLM's JSON (whole, or as
server-sent events). Everything a request can get wrong is found before it reaches the engine
and raised as an OpenAIError with the status and the field it names."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from plexus.core.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from plexus.core.lora.request import LoRARequest
from plexus.core.outputs import RequestOutput
from plexus.core.sampling_params import RequestOutputKind, SamplingParams, generation_defaults
from plexus.entrypoints.openai.protocol import (
    ChatMessage, CompletionRequest, LoadLoRAAdapterRequest, SamplingFields, UnloadLoRAAdapterRequest)
from plexus.entrypoints.openai.streams import first_output

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


class ServingBase:
    """What every endpoint shares: the served model and its LoRA modules, tokenization, a request's
    SamplingParams, queueing its prompts."""

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

    # ------------------------------------------------------------------ chat template and tokenizer

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
            return await first_output(stream), stream
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

    def _token_text(self, token_id: int, logprob) -> str:
        if self.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

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


_REQUEST_FIELDS = {f.name: None for f in dataclasses.fields(SamplingParams)} | {"prompt": None, "messages": None}


def _field_named_in(message: str, fields: dict) -> str | None:
    """The request field an error message is about, when it names one (for the error's `param`)."""
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(name) or f" {name}" in message or f"{name}=" in message:
            return name
    return None

