"""What the engine measures each step, and the loggers that read it (vLLM's stat loggers).

`StepStats` is built by LLMEngine.step from the step's scheduler output and the tokens it produced: plain
numbers, no torch. Loggers see every step: `LoggingStatLogger` writes vLLM's throughput line every few
seconds; the server adds a Prometheus logger (plexus/entrypoints/openai/metrics.py) with vLLM's metric names.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("plexus")


@dataclass
class FinishedRequestStats:
    """One finished request (n > 1 counts once): why it ended and how long each phase took."""
    finish_reason: str                   # stop | length | abort | error
    e2e_latency: float
    queue_time: float | None             # arrival -> first scheduled; None when it never ran
    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens: int | None
    n: int


@dataclass
class StepStats:
    """One step of the engine, or an abort between steps."""
    now: float
    num_running: int
    num_waiting: int
    kv_cache_usage: float                # fraction of KV blocks in use, 0..1
    num_prompt_tokens: int = 0           # prompt tokens computed this step (prefill)
    num_generation_tokens: int = 0
    num_preemptions: int = 0             # this step
    prefix_cache_queries: int = 0        # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int = 0           # of them, found
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)


class StatLogger:
    """The interface: called once per step (and on aborts) with that step's numbers."""

    def record(self, stats: StepStats) -> None:
        raise NotImplementedError

    def log(self) -> None:
        """Called by the server every few seconds; a logger that prints does it here."""


class LoggingStatLogger(StatLogger):
    """vLLM's periodic line: prompt and generation throughput, running / waiting, KV cache usage, prefix
    cache hit rate. `record` accumulates, `log` prints when at least `interval` seconds have passed."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.last_log = time.time()
        self._reset()
        self.last: StepStats | None = None

    def _reset(self) -> None:
        self.prompt_tokens = self.generation_tokens = self.preemptions = 0
        self.queries = self.hits = 0

    def record(self, stats: StepStats) -> None:
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.preemptions += stats.num_preemptions
        self.queries += stats.prefix_cache_queries
        self.hits += stats.prefix_cache_hits
        self.last = stats
        if stats.now - self.last_log >= self.interval:
            self.log(stats.now)

    def log(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        elapsed = now - self.last_log
        if elapsed <= 0 or self.last is None:
            return
        hit_rate = self.hits / self.queries if self.queries else 0.0
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%"
                    "%s", self.prompt_tokens / elapsed, self.generation_tokens / elapsed, self.last.num_running,
                    self.last.num_waiting, 100 * self.last.kv_cache_usage, 100 * hit_rate,
                    f", Preemptions: {self.preemptions}" if self.preemptions else "")
        self.last_log = now
        self._reset()


def step_stats(scheduler, kv_cache, now: float, num_preemptions: int = 0, lora: bool = False) -> StepStats:
    """The queue and cache numbers of this moment, and the prefix-cache counts since the last step."""
    stats = StepStats(now=now, num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                      kv_cache_usage=kv_cache.usage(), num_preemptions=num_preemptions)
    stats.prefix_cache_queries, stats.prefix_cache_hits = scheduler.take_prefix_cache_stats()
    if lora:
        names = {r.lora_id: r.lora_request.lora_name for r in (*scheduler.running, *scheduler.waiting)
                 if r.lora_id}
        stats.running_lora_adapters = sorted({names[r.lora_id] for r in scheduler.running if r.lora_id})
        stats.waiting_lora_adapters = sorted({names[r.lora_id] for r in scheduler.waiting if r.lora_id})
    return stats


def add_token_stats(stats: StepStats, update, first_sequence: bool, num_prompt_tokens: int) -> None:
    """A sequence produced tokens this step (update: core/scheduler.RequestUpdate): its time to first token
    (the request's first sequence only, so a request counts once) or the gap since its last token, and the
    request's prompt once it starts generating."""
    request = update.request
    stats.num_generation_tokens += len(update.new_tokens)
    if update.previous_token_time is None:
        if first_sequence:
            stats.time_to_first_tokens.append(request.first_token_time - request.arrival_time)
            stats.num_prompt_tokens += num_prompt_tokens
    else:
        stats.inter_token_latencies.append(request.last_token_time - update.previous_token_time)


def finished_stats(state, now: float) -> FinishedRequestStats:
    """state: the engine's RequestState (core/output_processor.py) of a request that just ended."""
    first = state.sequences[0].request
    reasons = [seq.request.status.finish_reason or "abort" for seq in state.sequences]
    reason = next((r for r in ("error", "abort", "stop") if r in reasons), reasons[0])
    return FinishedRequestStats(
        finish_reason=reason, e2e_latency=now - first.arrival_time,
        queue_time=None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time,
        num_prompt_tokens=len(state.prompt_token_ids),
        num_generation_tokens=sum(seq.request.num_output_tokens for seq in state.sequences),
        max_tokens=state.params.max_tokens, n=state.params.n)


def record(loggers: list[StatLogger], stats: StepStats) -> None:
    for stat_logger in loggers:
        try:
            stat_logger.record(stats)
        except Exception as error:  # noqa: BLE001  (a broken logger must not stop generation)
            logger.warning("stat logger %s failed: %s", type(stat_logger).__name__, error)
