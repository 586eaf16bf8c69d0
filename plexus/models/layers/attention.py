"""Paged attention.

Keys and values live in blocks of the cache; each request's block table
lists its blocks in order. Per step, the metadata below is built once and
shared by every layer. Sequences with a single new token (decodes, and
one-token prefill chunks) go to a decode kernel that reads keys and values
straight through the block table; the others are padded into one batch,
their keys gathered through the block tables, and run through SDPA with a
mask that keeps each query to the positions at or before its own. Without
the CPU kernels every sequence takes the SDPA path."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from plexus import kernels


@dataclass
class _PaddedGroup:
    """Sequences run through SDPA, their queries padded to the longest."""
    tokens: torch.Tensor | None    # [Tp] which of the step's T tokens belong here; None = all, in order
    block_tables: torch.Tensor     # [S, max_blocks]
    query_index: torch.Tensor      # [S, max_q] index into the group's tokens (Tp = a zero pad row)
    output_index: torch.Tensor     # [Tp] where each token sits in the flattened [S * max_q]
    mask: torch.Tensor             # [S, 1, max_q, max_seq_len] True where a query may attend
    max_seq_len: int


@dataclass
class _DecodeGroup:
    """Sequences with one new token, for the paged decode kernel."""
    tokens: torch.Tensor | None    # [Bd] which of the step's T tokens; None = all, in order
    block_tables: torch.Tensor     # [Bd, max_blocks]
    seq_lens: torch.Tensor         # [Bd]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor        # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor     # [T] cache slot of each new token
    num_tokens: int
    decode: _DecodeGroup | None
    padded: _PaddedGroup | None

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]],
              block_size: int, device: torch.device, use_decode_kernel: bool | None = None) -> AttentionMetadata:
        if use_decode_kernel is None:
            use_decode_kernel = kernels.available(torch.empty(0, device=device))
        q_lens = np.asarray(query_lens, dtype=np.int64)
        s_lens = np.asarray(seq_lens, dtype=np.int64)
        starts = np.cumsum(q_lens) - q_lens                       # first token of each sequence in T
        num_tokens = int(q_lens.sum())
        max_blocks = -(-int(s_lens.max()) // block_size)
        tables = np.zeros((len(block_ids), max_blocks), dtype=np.int64)
        for i, ids in enumerate(block_ids):
            n = min(len(ids), max_blocks)
            tables[i, :n] = ids[:n]

        # Slot of every new token: position -> (block table entry, offset in block).
        seq_of_token = np.repeat(np.arange(len(query_lens)), q_lens)
        pos = np.arange(num_tokens) - starts[seq_of_token] + (s_lens - q_lens)[seq_of_token]
        slots = tables[seq_of_token, pos // block_size] * block_size + pos % block_size
        positions = torch.from_numpy(pos)

        is_decode = (q_lens == 1) if use_decode_kernel else np.zeros(len(q_lens), dtype=bool)
        decode = padded = None
        if is_decode.any():
            everything = bool(is_decode.all())
            decode = _DecodeGroup(
                tokens=None if everything else torch.from_numpy(starts[is_decode]).to(device),
                block_tables=torch.from_numpy(tables[is_decode]).to(device),
                seq_lens=torch.from_numpy(s_lens[is_decode]).to(device))
        if not is_decode.all():
            padded = _build_padded(q_lens[~is_decode], s_lens[~is_decode], starts[~is_decode], tables[~is_decode],
                                   positions, block_size, device, everything=not is_decode.any())
        return cls(positions=positions.to(device), slot_mapping=torch.from_numpy(slots).to(device), num_tokens=num_tokens, decode=decode,
                   padded=padded)


def _build_padded(q_lens: np.ndarray, s_lens: np.ndarray, starts: np.ndarray, tables: np.ndarray,
                  positions: torch.Tensor, block_size: int, device: torch.device, everything: bool) -> _PaddedGroup:
    num_seqs, max_q, max_seq_len = len(q_lens), int(q_lens.max()), int(s_lens.max())
    tables = tables[:, :-(-max_seq_len // block_size)]
    group_tokens = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, q_lens)])
    local_starts = np.cumsum(q_lens) - q_lens
    offsets = np.arange(max_q)
    valid = offsets[None, :] < q_lens[:, None]                                  # [S, max_q]
    query_index = np.where(valid, local_starts[:, None] + offsets[None, :], len(group_tokens))
    output_index = (np.arange(num_seqs)[:, None] * max_q + offsets[None, :])[valid]
    # Positions of the padded queries; pad rows look at position 0 so no row is fully masked.
    q_pos = np.concatenate([positions.numpy()[group_tokens], [0]])[query_index]  # [S, max_q]
    mask = np.arange(max_seq_len)[None, None, :] <= q_pos[:, :, None]
    return _PaddedGroup(
        tokens=None if everything else torch.from_numpy(group_tokens).to(device),
        block_tables=torch.from_numpy(np.ascontiguousarray(tables)).to(device),
        query_index=torch.from_numpy(query_index).to(device),
        output_index=torch.from_numpy(output_index).to(device),
        mask=torch.from_numpy(mask[:, None]).to(device),
        max_seq_len=max_seq_len)


class TorchPagedAttention:
    """Attention over a paged cache of shape [2, num_blocks, block_size, num_kv_heads, head_dim].

    The new keys and values are already in the cache (RotaryEmbedding.apply_and_cache put them there);
    this reads them back with everything before them."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D] -> [T, Hq * D]
        if meta.padded is None:
            return self._decode(q, kv_cache, meta.decode)
        if meta.decode is None:
            return self._padded(q, kv_cache, meta.padded)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        out[meta.decode.tokens] = self._decode(q[meta.decode.tokens], kv_cache, meta.decode)
        out[meta.padded.tokens] = self._padded(q[meta.padded.tokens], kv_cache, meta.padded)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, group: _DecodeGroup) -> torch.Tensor:
        out = torch.ops.plexus.paged_attention_decode(q, kv_cache, group.block_tables, group.seq_lens, self.scale)
        return out.view(q.shape[0], -1)

    def _padded(self, q: torch.Tensor, kv_cache: torch.Tensor, group: _PaddedGroup) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        num_seqs = group.block_tables.shape[0]
        keys = k_cache[group.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :group.max_seq_len]
        values = v_cache[group.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :group.max_seq_len]
        q_padded = torch.cat([q, q.new_zeros(1, self.num_heads, self.head_dim)])[group.query_index]  # [S, Q, Hq, D]

        out = F.scaled_dot_product_attention(
            q_padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=group.mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [S, Hq, Q, D]
        out = out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)
        return out[group.output_index]  # [Tp, Hq * D]
