"""Continuous batching with chunked prefill. Every step hands out a token
budget: running requests first (one decode token each, or the next chunk of
their prompt), then waiting ones. Prefill and decode share one step. When
blocks run out a running request is preempted and later recomputed: the
newest under scheduling_policy="fcfs", the lowest-priority (highest value,
then newest) under "priority", where the waiting queue is also ordered by
priority. With LoRA, the running requests never use more than max_loras distinct
adapters; a waiting request whose adapter would exceed that is passed over
(keeping its place) until one of those adapters has no running request."""
from __future__ import annotations

import bisect
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


def _priority_key(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


class _PriorityQueue:
    """The waiting queue under scheduling_policy="priority": kept sorted by (priority, arrival time)."""

    def __init__(self) -> None:
        self._items: list[Request] = []

    def append(self, request: Request) -> None:
        bisect.insort(self._items, request, key=_priority_key)

    appendleft = append     # a preempted request goes back to its place by priority

    def popleft(self) -> Request:
        return self._items.pop(0)

    def remove(self, request: Request) -> None:
        self._items.remove(request)

    def __getitem__(self, index: int) -> Request:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def __contains__(self, request: Request) -> bool:
        return request in self._items


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.priority = config.policy == "priority"
        self.waiting: deque[Request] | _PriorityQueue = _PriorityQueue() if self.priority else deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Prompt tokens looked up in the prefix cache at admission, and those found (vLLM's prefix cache
        # queries / hits), since the last take_prefix_cache_stats().
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def _victim(self, first: int) -> Request:
        """The running request to preempt when blocks run out, among running[first:] (those not yet
        scheduled in this step)."""
        if not self.priority:
            return self.running.pop()
        victim = max(reversed(self.running[first:]), key=_priority_key)
        self.running.remove(victim)
        return victim

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
                victim = self._victim(i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_tokens))
                budget -= num_tokens
                i += 1

        # A step that had to preempt admits nobody new: the pool is full. A request whose LoRA adapter would be
        # one more than max_loras distinct adapters among the running waits (its place kept) for one to finish.
        max_loras = self.config.max_loras
        loras = {r.lora_id for r in self.running if r.lora_id} if max_loras else set()
        passed_over: list[Request] = []
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.lora_id and request.lora_id not in loras and len(loras) >= max_loras:
                passed_over.append(self.waiting.popleft())
                continue
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
                if self.kv_cache.enable_prefix_caching:
                    self.prefix_cache_queries += request.num_tokens
                    self.prefix_cache_hits += num_cached
            request.num_computed_tokens += num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_tokens))
            budget -= num_tokens
            if request.lora_id:
                loras.add(request.lora_id)
        for request in reversed(passed_over):
            self.waiting.appendleft(request)
        return out

    def take_prefix_cache_stats(self) -> tuple[int, int]:
        queries, hits = self.prefix_cache_queries, self.prefix_cache_hits
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        return queries, hits

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts once the model has run the step."""
        for scheduled in out.scheduled:
            if scheduled.request.is_finished:    # failed during the step; its blocks are freed
                continue
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
