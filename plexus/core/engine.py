"""LLMEngine: add_request / step / abort_request / has_unfinished_requests,
the loop every vLLM example drives."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from plexus.core.config import EngineArgs, EngineConfig
from plexus.core.detokenizer import IncrementalDetokenizer, detokenize_logprob_token
from plexus.core.executor import Executor
from plexus.core.kv_cache import KVCacheManager
from plexus.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from plexus.core.request import Request, RequestStatus
from plexus.core.sampling_params import SamplingParams
from plexus.core.scheduler import Scheduler
from plexus.worker.model_runner import TokenLogprobs

logger = logging.getLogger("plexus")


@dataclass
class _Sequence:
    """Engine-side state of one generated sequence: its text and logprobs."""
    request: Request
    index: int
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    lora_request: Any = None


def load_tokenizer(config: EngineConfig):
    if config.model.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    source = config.model.tokenizer or str(config.model.model_dir)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {source!r}: {e}") from None


class LLMEngine:
    def __init__(self, config: EngineConfig, log_stats: bool = False) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.executor = Executor(config)
        cache = config.cache
        self.kv_cache = KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.device = self.executor.device
        self.default_generator = torch.Generator(device=self.device).manual_seed(config.model.seed)
        eos = config.model.eos_token_ids()
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = {self.tokenizer.eos_token_id}
        self.eos_token_ids = frozenset(eos)
        self._states: dict[str, _RequestState] = {}

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> LLMEngine:
        return cls(engine_args.create_engine_config(), log_stats=not engine_args.disable_log_stats)

    def get_tokenizer(self):
        return self.tokenizer

    def get_model_config(self):
        return self.config.model

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    arrival_time: float | None = None, lora_request: Any = None, **kwargs: Any) -> None:
        """Queue a request. ``prompt`` is a string, ``{"prompt": str}`` or
        ``{"prompt_token_ids": [...]}``."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id).__name__}")
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__} "
                            "(pooling requests are not supported)")
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported yet")
        prompt_text, prompt_ids = self._tokenize(prompt)
        self._validate(params, prompt_ids)

        room = self._max_sequence_len(prompt_ids, params) - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        needed = self.kv_cache.blocks_needed(len(prompt_ids) + max_tokens - 1)
        if needed > self.kv_cache.num_blocks:
            raise ValueError(
                f"request {request_id!r} needs up to {needed} KV cache blocks ({len(prompt_ids)} prompt tokens + "
                f"{max_tokens} new tokens) but the cache has {self.kv_cache.num_blocks}; lower max_tokens or "
                "raise kv_cache_space / gpu_memory_utilization")

        state = _RequestState(request_id, prompt_text, prompt_ids, params, lora_request=lora_request)
        arrival = time.time() if arrival_time is None else arrival_time
        for index in range(params.n):
            child_params = params
            if index > 0 and params.prompt_logprobs is not None:
                child_params = params.clone()
                child_params.prompt_logprobs = None      # the prompt is shared; score it once
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            request = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{index}", parent_id=request_id,
                prompt_token_ids=prompt_ids, sampling_params=child_params, max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids, generator=generator, arrival_time=arrival)
            detokenizer = None
            if self.tokenizer is not None and params.detokenize:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens)
            state.sequences.append(_Sequence(request, index, detokenizer,
                                             [] if params.logprobs is not None else None))
        self._states[request_id] = state
        for seq in state.sequences:
            self.scheduler.add(seq.request)

    def _tokenize(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, ids = prompt["prompt"], None
        else:
            raise TypeError("prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}, "
                            f"got {type(prompt).__name__}")
        if ids is None:
            if not isinstance(text, str):
                raise TypeError(f"prompt text must be a string, got {type(text).__name__}")
            if not text:
                raise ValueError("the prompt is empty; give at least one token")
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer, but skip_tokenizer_init=True; "
                                 "pass {'prompt_token_ids': [...]} instead")
            ids = self.tokenizer.encode(text)
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.config.model.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}); got {bad[0]!r}")
        return text, ids

    def _validate(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        max_model_len = self.config.model.max_model_len
        if len(prompt_ids) > max_model_len - 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, which leaves no room to generate within "
                             f"max_model_len={max_model_len}; shorten the prompt or raise max_model_len")
        if params.prompt_logprobs is not None and not self.config.platform.supports_prompt_logprobs:
            raise ValueError(f"prompt_logprobs is not supported on the {self.config.platform.name} platform: its "
                             "compiled graphs return logits for the last position only")
        max_logprobs = self.config.model.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > max_logprobs:
                raise ValueError(f"{name}={value} exceeds max_logprobs={max_logprobs}; raise max_logprobs")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, but skip_tokenizer_init=True; use stop_token_ids")

    def _max_sequence_len(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """How long this request's sequence may grow. max_tokens past max_model_len is clipped (as vLLM
        does); past a platform's largest compiled bucket it is refused now rather than failing mid-way."""
        limit = self.config.model.max_model_len
        sched = self.config.scheduler
        if sched.max_prompt_len is not None and len(prompt_ids) > sched.max_prompt_len[0]:
            bound, setting = sched.max_prompt_len
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than the largest bucket of {setting} "
                             f"({bound}); shorten the prompt or add a larger bucket")
        if sched.max_seq_len is not None and sched.max_seq_len[0] < limit:
            bound, setting = sched.max_seq_len
            wanted = len(prompt_ids) + (1 if params.max_tokens is None else params.max_tokens)
            if wanted > bound:
                raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                                 f"({params.max_tokens or 1}) needs {wanted} positions, more than the largest "
                                 f"bucket of {setting} ({bound}); lower max_tokens or add a larger bucket")
            limit = bound
        return limit

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            state = self._states.pop(rid, None)
            if state is None:
                continue
            for seq in state.sequences:
                if not seq.request.is_finished:
                    self.scheduler.finish(seq.request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def get_num_unfinished_requests(self) -> int:
        return len(self._states)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache.reset_prefix_cache()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        result = self.executor.execute_model(scheduled, self.default_generator)
        self.scheduler.update_after_step(scheduled)
        now = time.time()

        progressed: dict[str, _RequestState] = {}
        for s in scheduled.scheduled:
            request = s.request
            state = self._states[request.parent_id]
            if request in result.prompt_logprobs:
                self._add_prompt_logprobs(request, state, result.prompt_logprobs[request])
            sampled = result.sampled.get(request)
            if sampled is None:
                continue
            seq = next(q for q in state.sequences if q.request is request)
            self._append_token(seq, sampled, now)
            progressed[state.request_id] = state

        outputs = []
        for state in progressed.values():
            finished = all(seq.request.is_finished for seq in state.sequences)
            outputs.append(self._make_output(state, finished, now))
            if finished:
                del self._states[state.request_id]
        return outputs

    def _append_token(self, seq: _Sequence, sampled: TokenLogprobs, now: float) -> None:
        request = seq.request
        params = request.sampling_params
        token = sampled.token_id
        request.append_token(token)
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        seq.cumulative_logprob += sampled.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_dict(sampled))

        status = None
        stop_token = False
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                status, stop_token = RequestStatus.FINISHED_STOPPED, True
            elif params.stop_token_ids and token in params.stop_token_ids:
                status, stop_token = RequestStatus.FINISHED_STOPPED, True
                request.stop_reason = token
        if seq.detokenizer is not None and not (stop_token and not params.include_stop_str_in_output):
            stop_str = seq.detokenizer.update([token])
            if stop_str is not None:
                status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = stop_str
        if status is None and (request.num_output_tokens >= request.max_tokens
                               or request.num_tokens >= self.config.model.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(request, status)

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        out = {entry.token_id: Logprob(entry.logprob, entry.rank, self._decode_token(entry.token_id))}
        for rank, (tok, lp) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1):
            if tok not in out:
                out[tok] = Logprob(lp, rank, self._decode_token(tok))
        return out

    def _decode_token(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else detokenize_logprob_token(self.tokenizer, token_id)

    def _add_prompt_logprobs(self, request: Request, state: _RequestState, entries: list[TokenLogprobs]) -> None:
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        request.prompt_logprobs.extend(self._logprob_dict(e) for e in entries)
        state.prompt_logprobs = request.prompt_logprobs

    def _make_output(self, state: _RequestState, finished: bool, now: float) -> RequestOutput:
        completions = []
        for seq in state.sequences:
            request = seq.request
            text = ""
            if seq.detokenizer is not None:
                text = seq.detokenizer.output_text if not request.is_finished else \
                    seq.detokenizer.get_next_output_text(finished=True, delta=False)
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(request.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob, logprobs=seq.logprobs,
                finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
                lora_request=state.lora_request))
        first = state.sequences[0].request
        metrics = RequestMetrics(
            arrival_time=first.arrival_time, last_token_time=first.last_token_time,
            first_scheduled_time=first.first_scheduled_time, first_token_time=first.first_token_time,
            time_in_queue=(first.first_scheduled_time - first.arrival_time) if first.first_scheduled_time else None,
            finished_time=now if finished else None)
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs, outputs=completions, finished=finished, metrics=metrics,
            lora_request=state.lora_request, num_cached_tokens=first.num_cached_tokens)
