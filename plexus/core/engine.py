"""LLMEngine: add_request / step / abort_request / has_unfinished_requests, the loop every vLLM example
drives. A step is: schedule, execute, update, make outputs."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from plexus.core import intake, metrics, stopping
from plexus.core.arg_utils import EngineArgs
from plexus.core.config import EngineConfig
from plexus.core.executor import make_executor
from plexus.core.failures import execute_isolating_failures
from plexus.core.input_processor import InputProcessor
from plexus.core.kv_cache import KVCacheManager
from plexus.core.lora.engine_api import LoRAEngineAPI
from plexus.core.lora.manager import LoRAManager
from plexus.core.metrics import LoggingStatLogger, StatLogger, StepStats
from plexus.core.output_processor import OutputProcessor, RequestState
from plexus.core.outputs import RequestOutput
from plexus.core.request import RequestStatus
from plexus.core.sampler import uses_history
from plexus.core.sampling_params import SamplingParams
from plexus.core.scheduler import RequestUpdate, Scheduler, SchedulerOutput
from plexus.core.step import SequenceStep, StepInput, StepOutput
from plexus.core.structured_output import StructuredOutputManager
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


class LLMEngine(LoRAEngineAPI):
    def __init__(self, config: EngineConfig, log_stats: bool = False) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.executor = make_executor(config)
        try:
            # Every worker says how many KV blocks its budget holds; all of them get the smallest.
            num_blocks = self.executor.determine_num_available_blocks()
            self.executor.initialize_cache(num_blocks)
            lora_targets = self.executor.lora_targets() if config.lora is not None else None
        except BaseException:
            self.executor.shutdown()
            raise
        cache = config.cache
        self.kv_cache = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
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
            self.lora = LoRAManager(config.lora, lora_targets, hub)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> LLMEngine:
        return cls(engine_args.create_engine_config(), log_stats=not engine_args.disable_log_stats)

    def get_tokenizer(self):
        return self.tokenizer

    def get_model_config(self):
        return self.config.model

    def collective_rpc(self, method: str | Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        """Call a method on every worker (vLLM's name): the answers in rank order."""
        return self.executor.collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)

    def check_health(self) -> None:
        """Raises (WorkerDiedError) when a worker is gone."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    arrival_time: float | None = None, lora_request: Any = None, priority: int = 0,
                    **kwargs: Any) -> None:
        """Queue a request. ``prompt`` is a string, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``.
        Everything is checked here, before the request joins a batch."""
        params = intake.check_arguments(request_id, params, priority, self._states, kwargs)
        if lora_request is not None:
            self._check_lora_request(lora_request)
        if self.executor.uses_processes:
            intake.check_picklable(request_id, params)
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
        state = intake.fan_out(
            request_id, processed, params, arrival=time.time() if arrival_time is None else arrival_time,
            priority=priority, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer,
            grammar_matcher=None if grammar is None else lambda: self.structured_output.matcher(grammar),
            lora_request=lora_request, lora_cache_key=lora_cache_key)
        self._states[request_id] = state
        for seq in state.sequences:
            self.scheduler.add(seq.request)

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
            stats = self._stats(time.time())
            stats.finished = [metrics.finished_stats(state, stats.now) for state in aborted]
            metrics.record(self.stat_loggers, stats)

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
        step_input = self._step_input(scheduled, self._lora_slots(scheduled, self.scheduler.fail))
        output = (execute_isolating_failures(self.executor, step_input, self._fail_by_id) if step_input.sequences
                  else StepOutput())    # every request of the step failed to get its adapter
        updates = self.scheduler.update_from_output(scheduled, output)
        return self._make_outputs(scheduled, updates)

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
                request_id=r.request_id, token_ids=s.token_ids, start=s.start, block_ids=r.block_ids,
                sample=s.samples, params=r.sampling, num_prompt_tokens=r.num_prompt_tokens,
                seed=r.seed, seed_offset=r.num_output_tokens, banned_token_ids=banned,
                bad_words_token_ids=r.bad_words_token_ids,
                prompt_token_ids=r.prompt_token_ids if history or scoring_prompt else None,
                output_token_ids=r.output_token_ids if history else None,
                prompt_logprobs_from=len(r.prompt_logprobs) if r.prompt_logprobs else 1,
                lora_slot=slot_of.get(r.lora_id, -1), token_bitmask=bitmask,
                draft_token_ids=list(s.draft_token_ids)))
        return StepInput(sequences, lora_loads=loads)

    def _fail_by_id(self, request_id: str, error: Exception) -> None:
        request = next(r for r in self.scheduler.running if r.request_id == request_id)
        self.scheduler.fail(request, error)

    def _make_outputs(self, scheduled: SchedulerOutput, updates: list[RequestUpdate]) -> list[RequestOutput]:
        """Logprobs and text for what each request got this step, then one RequestOutput per request that
        made progress (a finished one for the last time)."""
        now = time.time()
        stats = self._stats(now, len(scheduled.preempted)) if self.stat_loggers else None
        progressed: dict[str, RequestState] = {}
        for update in updates:
            request = update.request
            state = self._states[request.parent_id]
            seq = state.sequences[0] if len(state.sequences) == 1 else \
                next(q for q in state.sequences if q.request is request)
            try:
                if update.prompt_logprobs:
                    self.outputs.add_prompt_logprobs(request, state, update.prompt_logprobs)
                if update.new_tokens:
                    self.outputs.add_tokens(seq, update.new_tokens)
                    if stats is not None:
                        metrics.add_token_stats(stats, update, seq.index == 0, len(state.prompt_token_ids))
            except Exception as error:  # noqa: BLE001  (e.g. a tokenizer failing on a logprob token)
                if not request.is_finished:
                    self.scheduler.fail(request, error)
            if update.new_tokens or request.is_finished:
                progressed[state.request_id] = state

        outputs = []
        for state in progressed.values():
            output = self.outputs.make_output(state, now)
            if output is not None:
                outputs.append(output)
            if state.finished:
                del self._states[state.request_id]
                if stats is not None:
                    stats.finished.append(metrics.finished_stats(state, now))
        if stats is not None:
            stats.num_running, stats.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
            stats.kv_cache_usage = self.kv_cache.usage()
            metrics.record(self.stat_loggers, stats)
        return outputs

    def _stats(self, now: float, num_preemptions: int = 0) -> StepStats:
        return metrics.step_stats(self.scheduler, self.kv_cache, now, num_preemptions, lora=self.lora is not None)
