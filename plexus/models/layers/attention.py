"""Paged attention.

Keys and values live in blocks of the cache; each request's block table
lists its blocks in order. Per step, the metadata below is built once and
shared by every layer. Sequences with a single new token (decodes, and
one-token prefill chunks) form one decode group: here a batched SDPA over
keys gathered through the block tables, masked to each length; a platform's
backend may read keys and values straight through the block table instead
(decode_reads_block_tables, e.g. the CPU platform's C++ kernel). Longer
chunks run one SDPA call each over their own keys, causal from their first
new token, so no query is padded to another sequence's length. A backend
whose prefill kernel also reads the block tables (varlen, e.g. the CUDA
platform's Triton kernel) gets a step with several new tokens anywhere as
one flat description of every sequence instead (_Varlen), and runs it in one
launch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class _DecodeGroup:
    """Sequences with one new token."""
    tokens: torch.Tensor | None    # [B] which of the step's T tokens; None = all, in order
    block_tables: torch.Tensor     # [B, max_blocks]
    seq_lens: torch.Tensor         # [B]
    mask: torch.Tensor | None      # [B, 1, 1, max_seq_len] for the torch path; None with the kernel


@dataclass
class _PrefillChunk:
    """One sequence's chunk of several new tokens: tokens start..start+q_len of the step, the last
    q_len of its seq_len positions."""
    start: int
    q_len: int
    seq_len: int
    block_ids: torch.Tensor        # [ceil(seq_len / block_size)]
    mask: torch.Tensor | None      # [q_len, seq_len] when earlier positions are cached; None = plain causal


@dataclass
class _Varlen:
    """Every sequence of a step, in order, for a backend that runs a whole step of mixed prefill chunks and
    decodes in one kernel launch: sequence s's new tokens are rows query_start_loc[s]:query_start_loc[s+1]
    of the step, the last of its seq_lens[s] positions, causal from the first of them."""
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor         # [S] int32
    block_tables: torch.Tensor     # [S, max_blocks] int32
    max_query_len: int


@dataclass
class AttentionMetadata:
    positions: torch.Tensor        # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor     # [T] cache slot of each new token
    num_tokens: int
    decode: _DecodeGroup | None
    prefills: list[_PrefillChunk]
    varlen: _Varlen | None = None  # instead of decode and prefills, for a varlen backend

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]],
              block_size: int, device: torch.device, use_decode_kernel: bool = False,
              use_varlen_kernel: bool = False) -> AttentionMetadata:
        """use_decode_kernel: the backend reads decode keys through the block tables itself (no mask);
        use_varlen_kernel: it also runs steps with longer chunks in one call over _Varlen."""
        s_lens = np.asarray(seq_lens, dtype=np.int64)
        if use_decode_kernel and len(query_lens) == sum(query_lens):
            return cls._build_decode_only(s_lens, block_ids, block_size, device)
        q_lens = np.asarray(query_lens, dtype=np.int64)
        starts = np.cumsum(q_lens) - q_lens                       # first token of each sequence in T
        num_tokens = int(q_lens.sum())
        tables = _block_tables(block_ids, s_lens, block_size)

        # Slot of every new token: position -> (block table entry, offset in block).
        seq_of_token = np.repeat(np.arange(len(query_lens)), q_lens)
        pos = np.arange(num_tokens) - starts[seq_of_token] + (s_lens - q_lens)[seq_of_token]
        slots = tables[seq_of_token, pos // block_size] * block_size + pos % block_size
        positions = torch.from_numpy(pos)
        if use_varlen_kernel:
            varlen = _Varlen(
                query_start_loc=torch.from_numpy(np.append(starts, num_tokens).astype(np.int32)).to(device),
                seq_lens=torch.from_numpy(s_lens.astype(np.int32)).to(device),
                block_tables=torch.from_numpy(tables.astype(np.int32)).to(device), max_query_len=int(q_lens.max()))
            return cls(positions=positions.to(device), slot_mapping=torch.from_numpy(slots).to(device),
                       num_tokens=num_tokens, decode=None, prefills=[], varlen=varlen)

        is_decode = q_lens == 1
        decode = None
        if is_decode.any():
            tables_d = torch.from_numpy(np.ascontiguousarray(tables[is_decode])).to(device)
            lens_d = s_lens[is_decode]
            mask = None if use_decode_kernel else torch.from_numpy(
                np.arange(int(lens_d.max()))[None, None, None, :] < lens_d[:, None, None, None]).to(device)
            decode = _DecodeGroup(
                tokens=None if is_decode.all() else torch.from_numpy(starts[is_decode]).to(device),
                block_tables=tables_d, seq_lens=torch.from_numpy(lens_d).to(device), mask=mask)
        prefills = []
        for i in np.flatnonzero(~is_decode):
            q_len, seq_len = int(q_lens[i]), int(s_lens[i])
            mask = None
            if q_len < seq_len:   # earlier positions are in the cache: causal, aligned to the end
                mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=device).tril(seq_len - q_len)
            prefills.append(_PrefillChunk(int(starts[i]), q_len, seq_len,
                                          torch.from_numpy(tables[i, :-(-seq_len // block_size)]).to(device), mask))
        return cls(positions=positions.to(device), slot_mapping=torch.from_numpy(slots).to(device),
                   num_tokens=num_tokens, decode=decode, prefills=prefills)


    @classmethod
    def _build_decode_only(cls, s_lens: np.ndarray, block_ids: list[list[int]], block_size: int,
                           device: torch.device) -> AttentionMetadata:
        """The common step under load and at batch 1: one new token per sequence, all to the decode kernel."""
        num_seqs = len(s_lens)
        tables = _block_tables(block_ids, s_lens, block_size)
        pos = s_lens - 1
        slots = tables[np.arange(num_seqs), pos // block_size] * block_size + pos % block_size
        return cls(positions=torch.from_numpy(pos).to(device), slot_mapping=torch.from_numpy(slots).to(device),
                   num_tokens=num_seqs, decode=_DecodeGroup(None, torch.from_numpy(tables).to(device),
                                                            torch.from_numpy(s_lens).to(device), None),
                   prefills=[])


def _block_tables(block_ids: list[list[int]], seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    """[S, blocks of the longest sequence] block ids, zero-padded."""
    tables = np.zeros((len(block_ids), -(-int(seq_lens.max()) // block_size)), dtype=np.int64)
    for i, ids in enumerate(block_ids):
        n = min(len(ids), tables.shape[1])
        tables[i, :n] = ids[:n]
    return tables


class TorchPagedAttention:
    """Attention over a paged cache of shape [2, num_blocks, block_size, num_kv_heads, head_dim].

    The new keys and values are already in the cache (ModelOps.rope_and_cache put them there);
    this reads them back with everything before them."""

    # Whether decode groups need no mask: the backend reads keys through the block tables itself.
    decode_reads_block_tables = False
    # Whether steps with longer chunks come as one _Varlen description (AttentionMetadata.varlen).
    prefill_reads_block_tables = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D] -> [T, Hq * D]
        if not meta.prefills:
            return self._decode(q, kv_cache, meta.decode)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        if meta.decode is not None:
            out[meta.decode.tokens] = self._decode(q[meta.decode.tokens], kv_cache, meta.decode)
        for chunk in meta.prefills:
            out[chunk.start:chunk.start + chunk.q_len] = self._prefill(q[chunk.start:chunk.start + chunk.q_len],
                                                                         kv_cache, chunk)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, group: _DecodeGroup) -> torch.Tensor:
        num_seqs, max_len = q.shape[0], group.mask.shape[-1]
        keys = kv_cache[0][group.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :max_len]
        values = kv_cache[1][group.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :max_len]
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=group.mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)   # [B, Hq, 1, D]
        return out.view(num_seqs, -1)

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, chunk: _PrefillChunk) -> torch.Tensor:
        shape = (-1, self.num_kv_heads, self.head_dim)
        keys = kv_cache[0][chunk.block_ids].view(shape)[:chunk.seq_len].transpose(0, 1)     # [Hkv, S, D]
        values = kv_cache[1][chunk.block_ids].view(shape)[:chunk.seq_len].transpose(0, 1)
        # enable_gqa: each kv head serves its query-head group inside the kernel (bit-identical to
        # repeating the kv heads, ~15% faster on CPU at SmolLM2's 9:3 heads, no copies).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=chunk.mask,
            is_causal=chunk.mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)  # [1, Hq, Q, D]
        return out[0].transpose(0, 1).reshape(chunk.q_len, -1)
