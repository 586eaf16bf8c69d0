"""Decode steps through compiled graphs, one per batch-size bucket.

torch.compile with static shapes (dynamic=False) plays the part CUDA graphs
play on GPUs: the graph for a bucket is traced once, and every later step of
up to that many sequences is padded to the bucket (plexus.core.buckets) and
replayed without per-op Python. Padding rows decode token 0 at position 0
into a scratch KV block that no request owns, so they never touch real
sequences; block tables are padded to a fixed width (max_model_len /
block_size) so one graph serves every sequence length.

Graphs compile lazily, the first time a step needs their bucket (several
seconds each on a small CPU; torch's inductor cache makes later processes
faster)."""
from __future__ import annotations

import logging
import time

import torch

from plexus.core import buckets
from plexus.models.layers.attention import AttentionMetadata, _DecodeGroup

logger = logging.getLogger("plexus")


class CompiledDecode:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], sizes: list[int],
                 max_blocks: int, scratch_block: int, block_size: int, masked: bool = False,
                 max_seq_len: int | None = None) -> None:
        """masked: the attention backend needs a decode mask (it does not read block tables itself);
        max_seq_len: longer sequences run eagerly (vLLM's max_seq_len_to_capture)."""
        self.model = model
        self.masked = masked
        if max_seq_len is not None:
            max_blocks = min(max_blocks, -(-max_seq_len // block_size))
        self.kv_caches = kv_caches
        self.sizes = sizes
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.block_size = block_size
        self.graphs: dict[int, object] = {}
        self.bucket_steps: dict[int, int] = {}     # bucket -> steps it served (for tests and stats)

    def bucket_for(self, meta: AttentionMetadata) -> int | None:
        """The bucket a step would run in, or None when it is not a pure decode step that fits one."""
        if meta.prefills or meta.decode is None or meta.decode.block_tables.shape[1] > self.max_blocks:
            # (With the kernel's decode-only metadata the block tables are as wide as the longest sequence.)
            return None
        return buckets.pick_bucket(meta.num_tokens, self.sizes)

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata, bucket: int) -> torch.Tensor:
        """Final hidden states [B, hidden] of a decode step of B <= bucket sequences."""
        n = input_ids.shape[0]
        tables = meta.decode.block_tables
        tables = torch.nn.functional.pad(tables, (0, self.max_blocks - tables.shape[1]))
        tables = buckets.pad_to(tables, bucket, value=self.scratch_block)
        args = (buckets.pad_to(input_ids, bucket), buckets.pad_to(meta.positions, bucket),
                buckets.pad_to(meta.slot_mapping, bucket, value=self.scratch_slot), tables,
                buckets.pad_to(meta.decode.seq_lens, bucket, value=1), self.kv_caches)
        graph = self.graphs.get(bucket)
        if graph is None:
            graph = self.graphs[bucket] = torch.compile(self._forward, fullgraph=True, dynamic=False)
            start = time.perf_counter()
            out = graph(*args)
            logger.info("Compiled the decode graph for batch bucket %d in %.1f s", bucket, time.perf_counter() - start)
        else:
            out = graph(*args)
        self.bucket_steps[bucket] = self.bucket_steps.get(bucket, 0) + 1
        return out[:n]

    def _forward(self, input_ids, positions, slot_mapping, block_tables, seq_lens, kv_caches):
        mask = None
        if self.masked:
            width = block_tables.shape[1] * self.block_size
            mask = (torch.arange(width, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]
        meta = AttentionMetadata(
            positions=positions, slot_mapping=slot_mapping, num_tokens=input_ids.shape[0],
            decode=_DecodeGroup(tokens=None, block_tables=block_tables, seq_lens=seq_lens, mask=mask), prefills=[])
        return self.model(input_ids, positions, kv_caches, meta, fused=False)
