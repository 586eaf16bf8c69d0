"""Paged KV cache bookkeeping: a pool of fixed-size blocks, per-request block
tables, and a prefix cache of full blocks keyed by a chained hash of their
tokens. Blocks nobody references stay hashed in an LRU free queue until they
are reused, so a finished request's prefix can still be hit later."""
from __future__ import annotations

from collections import OrderedDict

from plexus.core.request import Request


def hash_block(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                       # block hash -> block id
        # Least recently freed first; values unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes over every full block of its tokens. The chain starts from the request's
        LoRA adapter (its cache key), so blocks computed under different adapters never match."""
        bs = self.block_size
        hashes = request.block_hashes
        root = None if request.lora_cache_key is None else hash(("lora", request.lora_cache_key))
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[-1] if hashes else root
            hashes.append(hash_block(parent, tuple(request.token_ids[i * bs:(i + 1) * bs])))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix. At least one token is left
        to compute, since the last position's logits are needed."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return []
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give the request blocks for num_new_tokens more tokens (after its
        computed tokens and any cached prefix). False if the pool is short."""
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens) - len(request.block_ids) - len(cached_blocks)
        # Cached blocks with no other user sit in the free queue and stop being free once taken.
        reclaimed = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if need + reclaimed > self.num_free_blocks:
            return False
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
        request.block_ids.extend(cached_blocks)
        for _ in range(max(need, 0)):
            block_id, _ = self.free_queue.popitem(last=False)
            old_hash = self.block_hash[block_id]
            if old_hash is not None:
                if self.cached.get(old_hash) == block_id:
                    del self.cached[old_hash]
                self.block_hash[block_id] = None
            self.ref_counts[block_id] = 1
            request.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        self.update_block_hashes(request)
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        for i in range(num_full):
            block_id = request.block_ids[i]
            if self.block_hash[block_id] is not None:
                continue
            block_hash = request.block_hashes[i]
            self.block_hash[block_id] = block_hash
            self.cached.setdefault(block_hash, block_id)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Give back the blocks past the first num_tokens positions (slots of rejected draft tokens)."""
        keep = self.blocks_needed(num_tokens)
        # Tail blocks first, so the deepest (least shareable) blocks are evicted first.
        for block_id in reversed(request.block_ids[keep:]):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
        del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self.trim(request, 0)

    def reset_prefix_cache(self) -> bool:
        if any(self.ref_counts):
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        return True
