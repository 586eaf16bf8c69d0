"""Paged attention in plain torch ops.

Keys and values live in blocks of the cache; each request's block table
lists its blocks in order. Per step, the metadata below is built once and
shared by every layer: queries of all requests are padded into one batch,
each request's keys are gathered through its block table, and a boolean
mask keeps each query to the positions at or before its own."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [T] cache slot of each new token
    block_tables: torch.Tensor     # [S, max_blocks]
    query_index: torch.Tensor      # [S, max_query_len] index into the T new tokens (T = a zero pad row)
    output_index: torch.Tensor     # [T] where each new token sits in the flattened [S * max_query_len]
    mask: torch.Tensor             # [S, 1, max_query_len, max_seq_len] True where a query may attend
    max_seq_len: int

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]],
              positions: torch.Tensor, block_size: int, device: torch.device) -> AttentionMetadata:
        num_seqs = len(query_lens)
        max_q = max(query_lens)
        max_seq_len = max(seq_lens)
        max_blocks = -(-max_seq_len // block_size)
        tables = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
        for i, ids in enumerate(block_ids):
            n = min(len(ids), max_blocks)
            tables[i, :n] = torch.tensor(ids[:n], dtype=torch.long)
        query_lens_t = torch.tensor(query_lens)
        starts = torch.cumsum(query_lens_t, 0) - query_lens_t
        num_tokens = int(query_lens_t.sum())
        offsets = torch.arange(max_q)
        valid = offsets[None, :] < query_lens_t[:, None]                       # [S, max_q]
        query_index = torch.where(valid, starts[:, None] + offsets[None, :], num_tokens)
        output_index = (torch.arange(num_seqs)[:, None] * max_q + offsets[None, :])[valid]
        # Positions of the padded queries; pad rows look at position 0 so no row is fully masked.
        q_pos = torch.cat([positions.cpu(), positions.new_zeros(1).cpu()])[query_index]   # [S, max_q]
        mask = torch.arange(max_seq_len)[None, None, :] <= q_pos[:, :, None]
        slots = []
        for ids, q_len, s_len in zip(block_ids, query_lens, seq_lens):
            pos = torch.arange(s_len - q_len, s_len)
            slots.append(torch.tensor(ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
        return cls(
            slot_mapping=torch.cat(slots).to(device),
            block_tables=tables.to(device),
            query_index=query_index.to(device),
            output_index=output_index.to(device),
            mask=mask[:, None].to(device),
            max_seq_len=max_seq_len,
        )


class TorchPagedAttention:
    """Attention over a paged cache of shape [2, num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        num_blocks, block_size = k_cache.shape[:2]
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)

        num_seqs = meta.block_tables.shape[0]
        keys = k_cache[meta.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :meta.max_seq_len]
        values = v_cache[meta.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :meta.max_seq_len]
        q_padded = torch.cat([q, q.new_zeros(1, self.num_heads, self.head_dim)])[meta.query_index]  # [S, Q, Hq, D]

        out = F.scaled_dot_product_attention(
            q_padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=meta.mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [S, Hq, Q, D]
        out = out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)
        return out[meta.output_index]  # [T, Hq * D]
