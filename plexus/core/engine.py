"""LLMEngine: add_request / step / abort_request / has_unfinished_requests,
the loop every vLLM example drives."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from plexus.core import stopping
from plexus.core.config import EngineArgs, EngineConfig
from plexus.core.detokenizer import IncrementalDetokenizer, detokenize_logprob_token
from plexus.core.executor import Executor
from plexus.core.kv_cache import KVCacheManager
from plexus.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from plexus.core.request import Request, RequestStatus
from plexus.core.sampler import uses_penalties
from plexus.core.sampling_params import SamplingParams
from plexus.core.scheduler import Scheduler, SchedulerOutput
from plexus.core.step import SequenceStep, StepInput, TokenLogprobs

logger = logging.getLogger("plexus")


@dataclass
class _Sequence:
    """Engine-side state of one generated sequence: its text and logprobs."""
    request: Request
    index: int
    stop_strings: stopping.StopStrings | None     # holds the detokenizer; None without one
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
        return AutoTokenizer.from_pretrained(source, local_files_only=True, use_fast=config.model.tokenizer_mode != "slow",
                                             trust_remote_code=config.model.trust_remote_code)
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
        self.log_stats = log_stats
        self._stats = _Stats()
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
            request = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{index}", parent_id=request_id,
                prompt_token_ids=prompt_ids, sampling_params=child_params, max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids, seed=None if params.seed is None else params.seed + index,
                arrival_time=arrival)
            stop_strings = None
            if self.tokenizer is not None and params.detokenize:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens)
                stop_strings = stopping.StopStrings(detokenizer, params.stop, params.include_stop_str_in_output,
                                                    params.min_tokens)
            state.sequences.append(_Sequence(request, index, stop_strings,
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
        result = self.executor.execute_model(self._step_input(scheduled))
        self.scheduler.update_after_step(scheduled)
        now = time.time()

        progressed: dict[str, _RequestState] = {}
        for s in scheduled.scheduled:
            request = s.request
            state = self._states[request.parent_id]
            prompt_logprobs = result.prompt_logprobs.get(request.request_id)
            if prompt_logprobs:
                self._add_prompt_logprobs(request, state, prompt_logprobs)
            tokens = result.sampled.get(request.request_id)
            if not tokens:
                continue
            seq = state.sequences[0] if len(state.sequences) == 1 else \
                next(q for q in state.sequences if q.request is request)
            self._append_tokens(seq, tokens, now)
            progressed[state.request_id] = state

        outputs = []
        for state in progressed.values():
            finished = all(seq.request.is_finished for seq in state.sequences)
            outputs.append(self._make_output(state, finished, now))
            if finished:
                del self._states[state.request_id]
        if self.log_stats:
            self._stats.record(scheduled, sum(len(t) for t in result.sampled.values()), now, self.scheduler)
        return outputs

    def _step_input(self, scheduled: SchedulerOutput) -> StepInput:
        """The step as plain data (core/step.py): what the model side needs, nothing live."""
        sequences = []
        for s in scheduled.scheduled:
            r = s.request
            params = r.sampling_params
            penalized = uses_penalties([params])
            scoring_prompt = params.prompt_logprobs is not None and s.start < r.num_prompt_tokens
            sequences.append(SequenceStep(
                request_id=r.request_id, token_ids=r.token_ids[s.start:s.start + s.num_tokens], start=s.start,
                block_ids=r.block_ids, sample=s.samples, params=params, num_prompt_tokens=r.num_prompt_tokens,
                seed=r.seed, seed_offset=r.num_output_tokens,
                banned_token_ids=stopping.banned_token_ids(r) if s.samples else [],
                prompt_token_ids=r.prompt_token_ids if penalized or scoring_prompt else None,
                output_token_ids=r.output_token_ids if penalized else None,
                prompt_logprobs_from=len(r.prompt_logprobs) if r.prompt_logprobs else 1))
        return StepInput(sequences)

    def _append_tokens(self, seq: _Sequence, tokens: list[TokenLogprobs], now: float) -> None:
        """Append what the step accepted, token by token, until the sequence stops (plexus.core.stopping);
        tokens after the stop are dropped."""
        request = seq.request
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        for sampled in tokens:
            request.append_token(sampled.token_id)
            seq.cumulative_logprob += sampled.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(self._logprob_dict(sampled))
            stop = stopping.stop_after_token(request, sampled.token_id, seq.stop_strings,
                                             self.config.model.max_model_len)
            if stop is not None:
                request.stop_reason = stop[1]
                self.scheduler.finish(request, stop[0])
                return

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
            if seq.stop_strings is not None:
                detokenizer = seq.stop_strings.detokenizer
                text = detokenizer.output_text if not request.is_finished else \
                    detokenizer.get_next_output_text(finished=True, delta=False)
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


class _Stats:
    """What disable_log_stats=False logs every few seconds, as vLLM's engine does."""

    INTERVAL_S = 5.0

    def __init__(self) -> None:
        self.last = time.time()
        self.prompt_tokens = self.generated_tokens = 0

    def record(self, scheduled: SchedulerOutput, generated: int, now: float, scheduler: Scheduler) -> None:
        self.prompt_tokens += sum(s.num_tokens for s in scheduled.scheduled
                                  if s.start < s.request.num_prompt_tokens)
        self.generated_tokens += generated
        elapsed = now - self.last
        if elapsed >= self.INTERVAL_S:
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Waiting: %d reqs, Preemptions: %d", self.prompt_tokens / elapsed,
                        self.generated_tokens / elapsed, len(scheduler.running), len(scheduler.waiting),
                        scheduler.num_preemptions)
            self.last, self.prompt_tokens, self.generated_tokens = now, 0, 0
