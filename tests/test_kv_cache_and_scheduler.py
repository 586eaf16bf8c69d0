"""The block manager and scheduler on their own, without a model: block
accounting, prefix sharing, eviction, chunking, mixing, preemption."""
from __future__ import annotations

from plexus.core.config import SchedulerConfig
from plexus.core.kv_cache import KVCacheManager
from plexus.core.request import Request, RequestStatus
from plexus.core.sampling_params import SamplingParams
from plexus.core.scheduler import Scheduler
from plexus.core.step import StepOutput, TokenLogprobs

BS = 4


def make_request(rid: str, prompt: list[int], **params) -> Request:
    return Request(request_id=rid, prompt_token_ids=prompt, sampling_params=SamplingParams(**params),
                   max_tokens=16, eos_token_ids=frozenset())


def run_step(scheduler: Scheduler, new_token: int = 7):
    """Schedule, 'run' (a model that samples new_token wherever it samples) and update."""
    out = scheduler.schedule()
    output = StepOutput(sampled={s.request.request_id: [TokenLogprobs(new_token, 0.0, None)]
                                 for s in out.scheduled if s.samples})
    scheduler.update_from_output(out, output)
    return out


def test_allocation_rounds_up_to_whole_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    r = make_request("a", list(range(9)))
    assert kv.allocate(r, 9)
    assert len(r.block_ids) == 3 and kv.num_free_blocks == 7
    r.num_computed_tokens = 9
    assert kv.allocate(r, 1)                 # the 10th token still fits in block 3
    assert len(r.block_ids) == 3
    kv.free(r)
    assert kv.num_free_blocks == 10 and r.block_ids == []


def test_allocation_fails_cleanly_when_the_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=BS, enable_prefix_caching=False)
    r = make_request("a", list(range(12)))
    assert not kv.allocate(r, 12)
    assert kv.num_free_blocks == 2 and r.block_ids == []


def test_shared_prefix_blocks_are_reused_with_reference_counts():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    first = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    kv.allocate(first, 10)
    first.num_computed_tokens = 10
    kv.cache_full_blocks(first)               # two full blocks become cached

    second = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 99])
    hits = kv.find_cached_prefix(second)
    assert hits == first.block_ids[:2]
    kv.allocate(second, 1, hits)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert [kv.ref_counts[b] for b in hits] == [2, 2]

    kv.free(first)
    kv.free(second)
    # Unreferenced but still cached: a third request with the prefix hits them again.
    third = make_request("c", [1, 2, 3, 4, 5, 6, 7, 8, 50, 51])
    assert kv.find_cached_prefix(third) == hits


def test_a_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    first = make_request("a", list(range(8)))
    kv.allocate(first, 8)
    first.num_computed_tokens = 8
    kv.cache_full_blocks(first)
    same = make_request("b", list(range(8)))
    assert len(kv.find_cached_prefix(same)) == 1    # 7 tokens at most may come from the cache -> 1 block


def test_different_prefixes_with_equal_second_blocks_do_not_share():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    first = make_request("a", [1, 1, 1, 1, 5, 6, 7, 8, 0])
    kv.allocate(first, 9)
    first.num_computed_tokens = 9
    kv.cache_full_blocks(first)
    other = make_request("b", [2, 2, 2, 2, 5, 6, 7, 8, 0])
    assert kv.find_cached_prefix(other) == []        # chained hashes: block 2 depends on block 1


def test_evicting_a_cached_block_removes_it_from_the_prefix_cache():
    kv = KVCacheManager(num_blocks=2, block_size=BS, enable_prefix_caching=True)
    first = make_request("a", [1, 2, 3, 4, 5])
    kv.allocate(first, 5)
    first.num_computed_tokens = 5
    kv.cache_full_blocks(first)
    kv.free(first)
    big = make_request("b", list(range(100, 108)))
    assert kv.allocate(big, 8)                       # takes both blocks, evicting the cached one
    assert kv.find_cached_prefix(make_request("c", [1, 2, 3, 4, 9])) == []


def test_chunked_prefill_respects_the_token_budget_and_mixes_with_decode():
    kv = KVCacheManager(num_blocks=100, block_size=BS, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10, enable_chunked_prefill=True,
                                          max_model_len=128), kv)
    short = make_request("short", [1, 2, 3])
    scheduler.add(short)
    run_step(scheduler)                              # short's prefill; it samples its first token
    long = make_request("long", list(range(25)))
    scheduler.add(long)
    out = run_step(scheduler)
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("short", 1), ("long", 9)]
    assert out.total_tokens == 10
    out = run_step(scheduler)
    assert [(s.request.request_id, s.num_tokens, s.samples) for s in out.scheduled] == \
        [("short", 1, True), ("long", 9, False)]
    out = run_step(scheduler)
    assert [(s.request.request_id, s.num_tokens, s.samples) for s in out.scheduled] == \
        [("short", 1, True), ("long", 7, True)]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    kv = KVCacheManager(num_blocks=100, block_size=BS, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=20, enable_chunked_prefill=False,
                                          max_model_len=20), kv)
    scheduler.add(make_request("a", list(range(15))))
    scheduler.add(make_request("b", list(range(10))))
    out = run_step(scheduler)
    assert [s.request.request_id for s in out.scheduled] == ["a"]       # b does not fit beside a
    out = run_step(scheduler)
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 10)]


def test_max_num_seqs_caps_the_running_set():
    kv = KVCacheManager(num_blocks=100, block_size=BS, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, enable_chunked_prefill=True,
                                          max_model_len=64), kv)
    for i in range(3):
        scheduler.add(make_request(str(i), [1, 2]))
    out = run_step(scheduler)
    assert len(out.scheduled) == 2 and len(scheduler.waiting) == 1


def test_out_of_blocks_preempts_the_newest_request_and_it_resumes_later():
    kv = KVCacheManager(num_blocks=3, block_size=BS, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100, enable_chunked_prefill=True,
                                          max_model_len=64), kv)
    old, new = make_request("old", [1, 2, 3, 4]), make_request("new", [5, 6, 7, 8])
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)                              # a block each; both sample a 5th token
    out = run_step(scheduler)                        # each needs a 2nd block, one is left: 'new' is evicted
    assert [r.request_id for r in out.preempted] == ["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0 and new.block_ids == []
    assert [s.request.request_id for s in out.scheduled] == ["old"]
    scheduler.finish(old, RequestStatus.FINISHED_LENGTH)
    out = run_step(scheduler)
    # 'new' recomputes its prompt and the token it had generated, then samples again.
    assert [(s.request.request_id, s.num_tokens, s.samples) for s in out.scheduled] == [("new", 5, True)]
    assert new.token_ids == [5, 6, 7, 8, 7, 7]


def test_update_from_output_keeps_accepted_drafts_and_rolls_back_the_rest():
    """k = 6 drafts scheduled after the real token, the model accepts j = 1 and samples one more. Worked by
    hand with block_size 4: prompt 1..6 computed, then 100 sampled.

    step 2 positions: 6:100  7:d0=101  8:d1=102  9:d2  10:d3  11:d4  12:d5   (7 positions, blocks 2 and 3 new)
    the model returns [101 (= d0, accepted), 200 (its own)]: positions 6-7 hold final tokens, 8-12 are
    rejected. After: tokens = prompt + [100, 101, 200], 8 computed, blocks 0-1 kept, 2-3 back in the pool,
    block 1 (tokens 5, 6, 100, 101) hashed; nothing of a rejected draft is in the prefix cache."""
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, enable_chunked_prefill=True,
                                          max_model_len=64), kv)
    r = make_request("a", [1, 2, 3, 4, 5, 6])
    scheduler.add(r)
    run_step(scheduler, new_token=100)
    assert r.token_ids == [1, 2, 3, 4, 5, 6, 100] and r.num_computed_tokens == 6 and len(r.block_ids) == 2

    r.draft_token_ids = [101, 102, 103, 104, 105, 106]
    out = scheduler.schedule()
    (s,) = out.scheduled
    assert (s.start, s.num_tokens, s.draft_token_ids, s.samples) == (6, 7, [101, 102, 103, 104, 105, 106], True)
    assert s.token_ids == [100, 101, 102, 103, 104, 105, 106]
    assert len(r.block_ids) == 4 and kv.num_free_blocks == 4          # KV reserved for every draft
    kept, rejected = r.block_ids[:2], r.block_ids[2:]

    updates = scheduler.update_from_output(out, StepOutput(sampled={"a": [TokenLogprobs(101, -0.1, None),
                                                                          TokenLogprobs(200, -0.2, None)]}))
    assert [t.token_id for t in updates[0].new_tokens] == [101, 200]
    assert r.token_ids == [1, 2, 3, 4, 5, 6, 100, 101, 200]
    assert r.num_computed_tokens == 8 and r.draft_token_ids == []
    assert r.block_ids == kept and kv.num_free_blocks == 6
    assert all(kv.ref_counts[b] == 0 and kv.block_hash[b] is None for b in rejected)
    first = hash((None, (1, 2, 3, 4)))
    second = hash((first, (5, 6, 100, 101)))
    assert kv.cached == {first: kept[0], second: kept[1]}

    # The next step computes the model's own token at position 8, in a fresh block.
    out = scheduler.schedule()
    assert (out.scheduled[0].start, out.scheduled[0].token_ids) == (8, [200]) and len(r.block_ids) == 3


def test_drafts_never_run_past_max_tokens_and_a_stop_inside_them_ends_the_request():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, enable_chunked_prefill=True,
                                          max_model_len=64), kv)
    r = Request(request_id="a", prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(stop_token_ids=[42]),
                max_tokens=4, eos_token_ids=frozenset())
    scheduler.add(r)
    run_step(scheduler, new_token=9)
    r.draft_token_ids = [10, 42, 11, 12, 13]
    out = scheduler.schedule()
    assert out.scheduled[0].draft_token_ids == [10, 42]        # 1 output so far, max_tokens 4: room for 2 drafts
    scheduler.update_from_output(out, StepOutput(sampled={"a": [TokenLogprobs(10, 0.0, None),
                                                                TokenLogprobs(42, 0.0, None),
                                                                TokenLogprobs(7, 0.0, None)]}))
    assert r.output_token_ids == [9, 10, 42] and r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 42
    assert r.block_ids == [] and kv.num_free_blocks == 8
