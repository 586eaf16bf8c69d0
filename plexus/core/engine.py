"""LLMEngine: add_request / step / abort_request / has_unfinished_requests,
the loop every vLLM example drives."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from plexus.core import stopping
from plexus.core.arg_utils import EngineArgs
from plexus.core.config import EngineConfig
from plexus.core.detokenizer import IncrementalDetokenizer
from plexus.core.executor import Executor
from plexus.core.input_processor import InputProcessor
from plexus.core.kv_cache import KVCacheManager
from plexus.core.lora.manager import LoRAManager
from plexus.core.lora.request import LoRARequest
from plexus.core.metrics import FinishedRequestStats, LoggingStatLogger, StatLogger, StepStats
from plexus.core.output_processor import OutputProcessor, RequestState, SequenceState
from plexus.core.outputs import RequestOutput
from plexus.core.request import Request, RequestStatus
from plexus.core.sampler import uses_history
from plexus.core.sampling_params import SamplingParams
from plexus.core.scheduler import Scheduler, SchedulerOutput
from plexus.core.step import SequenceStep, StepInput, StepOutput, TokenLogprobs
from plexus.core.structured_output import StructuredOutputManager, accept_token
from plexus.model_files import HubOptions

logger = logging.getLogger("plexus")


def load_tokenizer(config: EngineConfig):
    if config.model.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    source = str(config.model.tokenizer_dir or config.model.model_dir)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True,
                                             use_fast=config.model.tokenizer_mode != "slow",
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
        self.inputs = InputProcessor(config, self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer)
        self.log_stats = log_stats
        # Every step's numbers go to these (core/metrics.py); the server adds its Prometheus logger.
        self.stat_loggers: list[StatLogger] = [LoggingStatLogger()] if log_stats else []
        eos = config.model.eos_token_ids()
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = {self.tokenizer.eos_token_id}
        self.eos_token_ids = frozenset(eos)
        self.structured_output = StructuredOutputManager(config.structured_outputs, self.tokenizer,
                                                         config.model.vocab_size, self.eos_token_ids)
        self._states: dict[str, RequestState] = {}
        self.lora: LoRAManager | None = None
        if config.lora is not None:
            hub = HubOptions(cache_dir=config.env.hub_cache_dir, offline=config.env.hub_offline)
            self.lora = LoRAManager(config.lora, self.executor.lora_targets(), hub)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> LLMEngine:
        return cls(engine_args.create_engine_config(), log_stats=not engine_args.disable_log_stats)

    def get_tokenizer(self):
        return self.tokenizer

    def get_model_config(self):
        return self.config.model

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    arrival_time: float | None = None, lora_request: Any = None, priority: int = 0,
                    **kwargs: Any) -> None:
        """Queue a request. ``prompt`` is a string, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``.
        Everything is checked here, before the request joins a batch."""
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"add_request() got keyword arguments plexus does not act on: {', '.join(unknown)}")
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id).__name__}")
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__} "
                            "(pooling requests are not supported)")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an integer, got {priority!r}")
        if lora_request is not None:
            self._check_lora_request(lora_request)
        processed = self.inputs.process(prompt, params)
        prompt_ids, max_tokens = processed.prompt_token_ids, processed.max_tokens
        needed = self.kv_cache.blocks_needed(len(prompt_ids) + max_tokens - 1)
        if needed > self.kv_cache.num_blocks:
            raise ValueError(
                f"request {request_id!r} needs up to {needed} KV cache blocks ({len(prompt_ids)} prompt tokens + "
                f"{max_tokens} new tokens) but the cache has {self.kv_cache.num_blocks}; lower max_tokens or "
                "raise kv_cache_space / gpu_memory_utilization")
        grammar = self.structured_output.compile(params)     # a bad schema / regex / grammar raises here

        lora_cache_key = None
        if lora_request is not None:
            self.lora.register(lora_request)     # a new adapter is read and checked here
            lora_cache_key = self.lora.cache_key(lora_request.lora_int_id)
        state = RequestState(request_id, processed.prompt, prompt_ids, params, lora_request=lora_request)
        arrival = time.time() if arrival_time is None else arrival_time
        candidates = params.best_of or params.n
        for index in range(candidates):
            child_params = params
            if index > 0 and params.prompt_logprobs is not None:
                child_params = params.clone()
                child_params.prompt_logprobs = None      # the prompt is shared; score it once
            request = Request(
                request_id=request_id if candidates == 1 else f"{request_id}#{index}", parent_id=request_id,
                prompt_token_ids=prompt_ids, sampling_params=child_params, max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids, seed=None if params.seed is None else params.seed + index,
                arrival_time=arrival, priority=priority, bad_words_token_ids=processed.bad_words_token_ids,
                lora_request=lora_request, lora_cache_key=lora_cache_key,
                grammar=None if grammar is None else self.structured_output.matcher(grammar))
            stop_strings = None
            if self.tokenizer is not None and params.detokenize:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens)
                stop_strings = stopping.StopStrings(detokenizer, params.stop, params.include_stop_str_in_output,
                                                    params.min_tokens)
            state.sequences.append(SequenceState(request, index, stop_strings,
                                                 [] if params.logprobs is not None else None))
        self._states[request_id] = state
        for seq in state.sequences:
            self.scheduler.add(seq.request)

    def _check_lora_request(self, lora_request: Any) -> None:
        if self.lora is None:
            name = getattr(lora_request, "lora_name", lora_request)
            raise ValueError(f"lora_request {name!r} given but LoRA is not enabled; create the engine with "
                             "enable_lora=True")
        self.lora.check_request(lora_request)

    # ------------------------------------------------------------------ LoRA adapters (vLLM's names)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter and keep it in host memory (max_cpu_loras, least recently used evicted
        first). True if it was not loaded yet. Raises ValueError naming what is wrong with it."""
        self._check_lora_request(lora_request)
        return self.lora.add(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.lora is not None and self.lora.remove(lora_id)

    def list_loras(self) -> set[int]:
        """The lora_int_ids of the adapters held in host memory."""
        return set() if self.lora is None else self.lora.list()

    def pin_lora(self, lora_id: int) -> bool:
        """Keep an adapter in host memory (never evicted) and prefer keeping it in its device slot."""
        if self.lora is None:
            raise ValueError("pin_lora: LoRA is not enabled; create the engine with enable_lora=True")
        return self.lora.pin(lora_id)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        aborted = []
        for rid in ids:
            state = self._states.pop(rid, None)
            if state is None:
                continue
            for seq in state.sequences:
                if not seq.request.is_finished:
                    self.scheduler.finish(seq.request, RequestStatus.FINISHED_ABORTED)
            aborted.append(state)
        if aborted and self.stat_loggers:
            stats = self._scheduler_stats(time.time())
            stats.finished = [_finished_stats(state, stats.now) for state in aborted]
            self._record(stats)

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
        step_input = self._step_input(scheduled, self._lora_slots(scheduled))
        if not step_input.sequences:        # every request of the step failed to get its adapter
            result = StepOutput()
        else:
            result = self._execute(step_input)
        self.scheduler.update_after_step(scheduled)
        return self._process_step(scheduled, result)

    def _execute(self, step_input: StepInput) -> StepOutput:
        try:
            result = self.executor.execute_model(step_input)
        except Exception as error:  # noqa: BLE001  (one request must not take the others down)
            result = self._isolate_failures(step_input, error)
        return result

    def _process_step(self, scheduled: SchedulerOutput, result: StepOutput) -> list[RequestOutput]:
        now = time.time()
        stats = self._scheduler_stats(now, scheduled) if self.stat_loggers else None

        progressed: dict[str, RequestState] = {}
        for s in scheduled.scheduled:
            request = s.request
            if request.is_finished:      # failed in this step
                progressed[request.parent_id] = self._states[request.parent_id]
                continue
            state = self._states[request.parent_id]
            seq = state.sequences[0] if len(state.sequences) == 1 else \
                next(q for q in state.sequences if q.request is request)
            try:
                prompt_logprobs = result.prompt_logprobs.get(request.request_id)
                if prompt_logprobs:
                    self._add_prompt_logprobs(request, state, prompt_logprobs)
                tokens = result.sampled.get(request.request_id)
                if not tokens:
                    continue
                if stats is not None:
                    _token_stats(stats, seq, state, len(tokens), now)
                self._append_tokens(seq, tokens, now)
            except Exception as error:  # noqa: BLE001  (e.g. a tokenizer failing on this request's text)
                self._fail(request, error)
            progressed[state.request_id] = state

        outputs = []
        for state in progressed.values():
            output = self.outputs.make_output(state, now)
            if output is not None:
                outputs.append(output)
            if state.finished:
                del self._states[state.request_id]
                if stats is not None:
                    stats.finished.append(_finished_stats(state, now))
        if stats is not None:
            stats.num_running, stats.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
            stats.kv_cache_usage = self.kv_cache.usage()
            self._record(stats)
        return outputs

    def _scheduler_stats(self, now: float, scheduled: SchedulerOutput | None = None) -> StepStats:
        scheduler = self.scheduler
        stats = StepStats(now=now, num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                          kv_cache_usage=self.kv_cache.usage())
        if scheduled is not None:
            stats.num_preemptions = len(scheduled.preempted)
            stats.prefix_cache_queries, stats.prefix_cache_hits = scheduler.take_prefix_cache_stats()
        if self.lora is not None:
            names = {r.lora_id: r.lora_request.lora_name for r in (*scheduler.running, *scheduler.waiting)
                     if r.lora_id}
            stats.running_lora_adapters = sorted({names[r.lora_id] for r in scheduler.running if r.lora_id})
            stats.waiting_lora_adapters = sorted({names[r.lora_id] for r in scheduler.waiting if r.lora_id})
        return stats

    def _record(self, stats: StepStats) -> None:
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.record(stats)
            except Exception as error:  # noqa: BLE001  (a broken logger must not stop generation)
                logger.warning("stat logger %s failed: %s", type(stat_logger).__name__, error)

    def _lora_slots(self, scheduled: SchedulerOutput) -> tuple[dict[int, int], dict]:
        """Device slots for the step's adapters (adapter id -> slot) and the slots to fill. A request whose
        adapter can no longer be read (its files changed or went away) fails alone."""
        if self.lora is None:
            return {}, {}
        requests = {s.request.lora_id: s.request.lora_request for s in scheduled.scheduled if s.request.lora_id}
        if not requests:
            return {}, {}
        slot_of, loads, failed = self.lora.assign_slots(set(requests), requests)
        for s in scheduled.scheduled:
            if s.request.lora_id in failed:
                self._fail(s.request, failed[s.request.lora_id])
        return slot_of, loads

    def _step_input(self, scheduled: SchedulerOutput, lora: tuple[dict[int, int], dict] = ({}, {})) -> StepInput:
        """The step as plain data (core/step.py): what the model side needs, nothing live."""
        slot_of, loads = lora
        sequences = []
        for s in scheduled.scheduled:
            r = s.request
            if r.is_finished:
                continue
            params = r.sampling_params
            history = uses_history(params)
            scoring_prompt = params.prompt_logprobs is not None and s.start < r.num_prompt_tokens
            banned = stopping.banned_token_ids(r) if s.samples else []
            bitmask = None
            if s.samples and r.grammar is not None:     # structured outputs: what its grammar allows next
                bitmask, banned = self.structured_output.next_token_bitmask(r.grammar, banned)
            sequences.append(SequenceStep(
                request_id=r.request_id, token_ids=r.token_ids[s.start:s.start + s.num_tokens], start=s.start,
                block_ids=r.block_ids, sample=s.samples, params=params, num_prompt_tokens=r.num_prompt_tokens,
                seed=r.seed, seed_offset=r.num_output_tokens,
                banned_token_ids=banned,
                bad_words_token_ids=r.bad_words_token_ids,
                prompt_token_ids=r.prompt_token_ids if history or scoring_prompt else None,
                output_token_ids=r.output_token_ids if history else None,
                prompt_logprobs_from=len(r.prompt_logprobs) if r.prompt_logprobs else 1,
                lora_slot=slot_of.get(r.lora_id, -1), token_bitmask=bitmask))
        return StepInput(sequences, lora_loads=loads)

    def _isolate_failures(self, step: StepInput, error: Exception) -> StepOutput:
        """The step raised: run each sequence's part alone, so the ones that fail on their own finish with
        finish_reason "error" and the rest go on. (Rerunning writes the same keys and values again.)"""
        logger.warning("a step failed (%s: %s); running its %d sequences one by one", type(error).__name__,
                       error, len(step.sequences))
        result = StepOutput()
        for seq in step.sequences:
            try:
                alone = self.executor.execute_model(StepInput([seq], lora_loads=step.lora_loads))
            except Exception as seq_error:  # noqa: BLE001
                request = next(r for r in self.scheduler.running if r.request_id == seq.request_id)
                self._fail(request, seq_error)
                continue
            result.sampled.update(alone.sampled)
            result.prompt_logprobs.update(alone.prompt_logprobs)
        return result

    def _fail(self, request: Request, error: Exception) -> None:
        logger.error("request %r failed: %s: %s", request.parent_id, type(error).__name__, error)
        request.stop_reason = f"{type(error).__name__}: {error}"
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)

    def _append_tokens(self, seq: SequenceState, tokens: list[TokenLogprobs], now: float) -> None:
        """Append what the step accepted, token by token, until the sequence stops (plexus.core.stopping);
        tokens after the stop are dropped."""
        request = seq.request
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        decode = request.sampling_params.detokenize
        for sampled in tokens:
            request.append_token(sampled.token_id)
            if request.grammar is not None:
                accept_token(request.grammar, sampled.token_id)
            seq.cumulative_logprob += sampled.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(self.outputs.logprob_dict(sampled, decode))
            stop = stopping.stop_after_token(request, sampled.token_id, seq.stop_strings,
                                             self.config.model.max_model_len)
            if stop is not None:
                request.stop_reason = stop[1]
                self.scheduler.finish(request, stop[0])
                return

    def _add_prompt_logprobs(self, request: Request, state: RequestState, entries: list[TokenLogprobs]) -> None:
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        decode = request.sampling_params.detokenize
        request.prompt_logprobs.extend(self.outputs.logprob_dict(e, decode) for e in entries)
        state.prompt_logprobs = request.prompt_logprobs


def _token_stats(stats: StepStats, seq: SequenceState, state: RequestState, num_tokens: int, now: float) -> None:
    """A sequence produced tokens this step: its time to first token (the request's first sequence only, so a
    request counts once) or the gap since its last token, and the request's prompt once it starts generating."""
    request = seq.request
    stats.num_generation_tokens += num_tokens
    if request.first_token_time is None:
        if seq.index == 0:
            stats.time_to_first_tokens.append(now - request.arrival_time)
            stats.num_prompt_tokens += len(state.prompt_token_ids)
    else:
        stats.inter_token_latencies.append(now - request.last_token_time)


def _finished_stats(state: RequestState, now: float) -> FinishedRequestStats:
    first = state.sequences[0].request
    reasons = [seq.request.status.finish_reason or "abort" for seq in state.sequences]
    reason = next((r for r in ("error", "abort", "stop") if r in reasons), reasons[0])
    return FinishedRequestStats(
        finish_reason=reason, e2e_latency=now - first.arrival_time,
        queue_time=None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time,
        num_prompt_tokens=len(state.prompt_token_ids),
        num_generation_tokens=sum(seq.request.num_output_tokens for seq in state.sequences),
        max_tokens=state.params.max_tokens, n=state.params.n)
