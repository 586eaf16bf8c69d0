"""Continuous batching with chunked prefill. Every step hands out a token
budget: running requests first (one decode token each, or the next chunk of
their prompt), then waiting ones. Prefill and decode share one step. When
blocks run out a running request is preempted and later recomputed: the
newest under scheduling_policy="fcfs", the lowest-priority (highest value,
then newest) under "priority", where the waiting queue is also ordered by
priority. With LoRA, the running requests never use more than max_loras distinct
adapters; a waiting request whose adapter would exceed that is passed over
(keeping its place) until one of those adapters has no running request.

After the model ran a step, update_from_output is the one place that changes a
request for it: it appends the accepted tokens, asks core/stopping.py whether
the request stops, advances the computed count by what was accepted (drafts the
model rejected are rolled back), hashes blocks whose tokens are final, and
frees finished requests."""
from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from plexus.core import stopping
from plexus.core.config import SchedulerConfig
from plexus.core.kv_cache import KVCacheManager
from plexus.core.request import Request, RequestStatus
from plexus.core.step import StepOutput, TokenLogprobs
from plexus.core.structured_output import accept_token

logger = logging.getLogger("plexus")


@dataclass
class ScheduledRequest:
    request: Request
    start: int                 # request.num_computed_tokens when scheduled
    num_tokens: int            # positions computed this step: [start, start + num_tokens), drafts included
    # Proposed tokens to verify: the last len(draft_token_ids) of those positions (speculative decoding).
    draft_token_ids: list[int] = field(default_factory=list)
    # Whether this step reaches the end of the request's tokens, so its last real position is sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_real_tokens == self.request.num_tokens

    @property
    def num_real_tokens(self) -> int:
        return self.num_tokens - len(self.draft_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """The tokens at this step's positions: the request's own, then the drafts."""
        return self.request.token_ids[self.start:self.start + self.num_real_tokens] + self.draft_token_ids


@dataclass
class RequestUpdate:
    """What one step did to one request, for the engine's outputs and stats."""
    request: Request
    new_tokens: list[TokenLogprobs] = field(default_factory=list)   # appended, up to and including a stop
    prompt_logprobs: list[TokenLogprobs] | None = None             # prompt positions scored this step
    previous_token_time: float | None = None                       # its last token's time before this step


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
            drafts = self._drafts(request, num_tokens, budget)
            num_tokens += len(drafts)
            while not self.kv_cache.allocate(request, num_tokens):
                victim = self._victim(i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_tokens, drafts))
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

    @staticmethod
    def _drafts(request: Request, num_tokens: int, budget: int) -> list[int]:
        """The request's proposed tokens that fit this step: only after its last real token, within the token
        budget, and never past max_tokens (the KV it was admitted with covers prompt + max_tokens - 1)."""
        if not request.draft_token_ids or request.num_computed_tokens + num_tokens < request.num_tokens:
            return []
        room = min(budget - num_tokens, request.max_tokens - request.num_output_tokens - 1)
        return request.draft_token_ids[:max(room, 0)]

    def take_prefix_cache_stats(self) -> tuple[int, int]:
        queries, hits = self.prefix_cache_queries, self.prefix_cache_hits
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        return queries, hits

    def update_from_output(self, out: SchedulerOutput, output: StepOutput) -> list[RequestUpdate]:
        """Apply what the model returned for a step: per scheduled request, append the tokens it accepted
        and stop where core/stopping.py says, advance its computed count by the positions that hold final
        tokens (the scheduled ones, less the drafts the model rejected, whose slots are given back and never
        hashed), register its full blocks in the prefix cache, and free it when it finished."""
        now = time.time()
        updates = []
        for scheduled in out.scheduled:
            request = scheduled.request
            update = RequestUpdate(request, prompt_logprobs=output.prompt_logprobs.get(request.request_id),
                                   previous_token_time=request.last_token_time)
            updates.append(update)
            if request.is_finished:      # failed during the step; its blocks are freed
                continue
            tokens = output.sampled.get(request.request_id, [])
            drafts = scheduled.draft_token_ids
            request.num_computed_tokens = scheduled.start + scheduled.num_tokens
            if drafts:
                request.num_computed_tokens -= len(drafts) - _num_accepted(drafts, tokens)
                request.draft_token_ids = []
            try:
                stop = self._append(request, tokens, update.new_tokens, now)
            except Exception as error:  # noqa: BLE001  (e.g. a tokenizer failing on this request's text)
                self.fail(request, error)
                continue
            if drafts:      # rejected drafts' slots: never hashed, their whole blocks back to the pool
                request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens)
                self.kv_cache.trim(request, request.num_computed_tokens)
            self.kv_cache.cache_full_blocks(request)
            if stop is not None:
                request.stop_reason = stop[1]
                self.finish(request, stop[0])
        return updates

    def _append(self, request: Request, tokens: list[TokenLogprobs], appended: list[TokenLogprobs],
                now: float) -> tuple[RequestStatus, int | str | None] | None:
        """Append the step's tokens one by one until the request stops; tokens after a stop are dropped."""
        if not tokens:
            return None
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        for sampled in tokens:
            request.append_token(sampled.token_id)
            appended.append(sampled)
            if request.grammar is not None:
                accept_token(request.grammar, sampled.token_id)
            stop = stopping.stop_after_token(request, sampled.token_id, request.stop_strings,
                                             self.config.max_model_len)
            if stop is not None:
                return stop
        return None

    def fail(self, request: Request, error: BaseException) -> None:
        """Finish one request with finish_reason "error" and the message as its stop reason; the others go on."""
        logger.error("request %r failed: %s: %s", request.parent_id, type(error).__name__, error)
        request.stop_reason = f"{type(error).__name__}: {error}"
        self.finish(request, RequestStatus.FINISHED_ERROR)

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


def _num_accepted(drafts: list[int], tokens: list[TokenLogprobs]) -> int:
    """How many of the drafts the model accepted: those its returned tokens repeat, before the one token it
    sampled itself (a verified step returns the j accepted drafts and then one more)."""
    accepted = 0
    for draft, sampled in zip(drafts, tokens[:-1]):
        if draft != sampled.token_id:
            break
        accepted += 1
    return accepted
