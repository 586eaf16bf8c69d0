"""Continuous batching with chunked prefill. Every step hands out a token
budget: running requests first (one decode token each, or the next chunk of
their prompt), then waiting ones. Prefill and decode share one step. When
blocks run out the newest running request is preempted and later recomputed."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from plexus.core.config import SchedulerConfig
from plexus.core.kv_cache import KVCacheManager
from plexus.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    start: int                 # request.num_computed_tokens when scheduled
    num_tokens: int            # tokens computed this step: positions [start, start + num_tokens)
    # Whether this step reaches the end of the request's tokens, so its last position is sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv_cache.allocate(request, num_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_tokens))
                budget -= num_tokens
                i += 1

        # A step that had to preempt admits nobody new: the pool is full.
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached) * self.kv_cache.block_size
            num_tokens = request.num_tokens - request.num_computed_tokens - num_cached
            if num_tokens > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_tokens = budget
            if not self.kv_cache.allocate(request, num_tokens, cached):
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens += num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_tokens))
            budget -= num_tokens
        return out

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts once the model has run the step."""
        for scheduled in out.scheduled:
            scheduled.request.num_computed_tokens += scheduled.num_tokens
            self.kv_cache.cache_full_blocks(scheduled.request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        if request.num_output_tokens == 0:
            request.prompt_logprobs = None   # recomputed from the start with the prompt
        self.waiting.appendleft(request)
        self.num_preemptions += 1
