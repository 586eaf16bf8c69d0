"""The offline API: ``LLM(...).generate(prompts, sampling_params)``, as vLLM's."""
from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from plexus.core.arg_utils import EngineArgs
from plexus.core.engine import LLMEngine
from plexus.core.outputs import RequestOutput
from plexus.core.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams, generation_defaults
from plexus.entrypoints.beam_search import BeamSearchOutput


class LLM:
    """An LLM for offline generation.

    Args:
        model: a local HF model directory, a .gguf file, a Hugging Face hub
            id, or None for the bundled SmolLM2-135M-Instruct.
        tokenizer: a tokenizer directory (default: the model's).
        **kwargs: any EngineArgs field (dtype, seed, max_model_len,
            max_num_seqs, max_num_batched_tokens, block_size,
            enable_prefix_caching, enable_chunked_prefill, device,
            quantization, tensor_parallel_size, kv_cache_space,
            gpu_memory_utilization, enforce_eager, skip_tokenizer_init, ...).
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("disable_log_stats", True)   # as vLLM's LLM: offline runs show a progress bar instead
        engine_args = EngineArgs.from_kwargs("LLM", model=model, tokenizer=tokenizer, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def collective_rpc(self, method: str | Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        """Call a method on every worker (a worker method's name, or a function taking the worker first), as
        vLLM's LLM.collective_rpc: the answers in rank order. With distributed_executor_backend="mp" the
        function travels by cloudpickle."""
        return self.llm_engine.collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's LLM.reset_prefix_cache); False if some are still in use
        by running requests, and then nothing is reset."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults, as vLLM does."""
        return SamplingParams(**generation_defaults(self.llm_engine.config.model.generation_config))

    def generate(self, prompts: Any = None, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: Any = None, priority: int | list[int] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None) -> list[RequestOutput]:
        """Generate completions for one prompt or a list of them (strings, ``{"prompt": ...}`` or
        ``{"prompt_token_ids": [...]}``). Returns one RequestOutput per prompt, in input order.

        Args:
            sampling_params: one SamplingParams for all prompts, or one per prompt.
            priority: one integer for all prompts, or one per prompt; lower runs first with
                scheduling_policy="priority" (accepted and ignored under the default "fcfs", as in vLLM).
            prompt_token_ids: vLLM's legacy keyword (deprecated): one list of token ids, or a list of them.
        """
        if prompt_token_ids is not None:
            warnings.warn("prompt_token_ids= is deprecated, as in vLLM: pass prompts as {'prompt_token_ids': [...]} "
                          "(TokensPrompt) instead", DeprecationWarning, stacklevel=2)
            if prompts is not None:
                raise ValueError("pass either prompts or prompt_token_ids, not both")
            flat = bool(prompt_token_ids) and not isinstance(prompt_token_ids[0], (list, tuple))
            prompts = [{"prompt_token_ids": ids} for ids in ([prompt_token_ids] if flat else prompt_token_ids)]
        if prompts is None:
            raise ValueError("generate() needs prompts (or prompt_token_ids)")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        if isinstance(priority, int) and not isinstance(priority, bool):
            priority = [priority] * len(prompts)
        elif priority is not None and (not isinstance(priority, (list, tuple)) or len(priority) != len(prompts)):
            count = f"{len(priority)} priorities" if isinstance(priority, (list, tuple)) else f"priority={priority!r}"
            raise ValueError(f"got {len(prompts)} prompts but {count}; pass one integer for all prompts or one "
                             "per prompt")
        lora_list = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(lora_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(lora_list)} lora_requests; pass one LoRARequest "
                             "(or None) for all prompts, or one per prompt")
        return self._run(prompts, params_list, lora_list, use_tqdm, priority or [0] * len(prompts))

    def _params_per_prompt(self, sampling_params: Any, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * n
        elif isinstance(sampling_params, (list, tuple)):
            params_list = list(sampling_params)
            if len(params_list) != n:
                raise ValueError(f"got {n} prompts but {len(params_list)} sampling_params; "
                                 "pass one SamplingParams or one per prompt")
        else:
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}"
                            + (" (build it with SamplingParams(**d))" if isinstance(sampling_params, dict) else ""))
        bad = next((p for p in params_list if not isinstance(p, SamplingParams)), None)
        if bad is not None:
            raise TypeError(f"sampling_params must be SamplingParams, got {type(bad).__name__}")
        # generate() returns each request once, finished: a DELTA request would come back holding only its
        # last piece, so it runs as FINAL_ONLY (vLLM does the same).
        return [p if p.output_kind != RequestOutputKind.DELTA else
                dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list | None = None,
             use_tqdm: bool = True, lora_request: Any = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted
        with the tokenizer's chat template."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer, but skip_tokenizer_init=True")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, chat_template=chat_template, tools=tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            # The template already wrote the special tokens (BOS and the like).
            prompts.append({"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False), "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def beam_search(self, prompts: Any, params: BeamSearchParams, lora_request: Any = None,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search over each prompt (vLLM's LLM.beam_search): the beam_width sequences with the best
        length-penalized cumulative logprob."""
        from plexus.entrypoints.beam_search import run_beam_search

        return run_beam_search(self, prompts, params, use_tqdm, lora_request=lora_request)

    def _run(self, prompts: list, params_list: list[SamplingParams], lora_list: list,
             use_tqdm: bool, priorities: list[int] | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        priorities = priorities or [0] * len(prompts)
        try:
            for prompt, params, lora, priority in zip(prompts, params_list, lora_list, priorities):
                request_id = str(next(self._request_counter))
                engine.add_request(request_id, prompt, params, lora_request=lora, priority=priority)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)   # all or nothing: no half-submitted batch stays queued
            raise

        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start = time.perf_counter()
        prompt_tokens = output_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        prompt_tokens += len(output.prompt_token_ids)
                        output_tokens += sum(len(c.token_ids) for c in output.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"est. speed input: {prompt_tokens / elapsed:.2f} toks/s, "
                                            f"output: {output_tokens / elapsed:.2f} toks/s")
                        bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]
