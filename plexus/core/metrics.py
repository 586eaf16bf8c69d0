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
