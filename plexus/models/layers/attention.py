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

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 has_sinks: bool = False) -> None:
        """sliding_window: a query at position p attends keys at p - sliding_window < k <= p (HF's rule);
        logits_soft_cap: scores become cap * tanh(scores / cap) before the softmax (Gemma 2); has_sinks: each
        call passes a learned logit per query head that joins every softmax and takes its share of the weight
        (gpt-oss)."""
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.has_sinks = has_sinks
        # Plain causal softmax attention over every earlier position: what the platforms' kernels compute.
        # Anything else runs here in torch, whichever backend the layer has.
        self.plain = sliding_window is None and logits_soft_cap is None and not has_sinks

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
        # q: [T, Hq, D] -> [T, Hq * D]
        if meta.varlen is not None:
            return self._varlen(q, kv_cache, meta.varlen, sinks)
        if not meta.prefills:
            return self._decode(q, kv_cache, meta.decode, sinks)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        if meta.decode is not None:
            out[meta.decode.tokens] = self._decode(q[meta.decode.tokens], kv_cache, meta.decode, sinks)
        for chunk in meta.prefills:
            out[chunk.start:chunk.start + chunk.q_len] = self._sequence(
                q[chunk.start:chunk.start + chunk.q_len], kv_cache, chunk.block_ids, chunk.seq_len, chunk.mask,
                sinks)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, group: _DecodeGroup,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        num_seqs = q.shape[0]
        mask = group.mask
        if mask is None or self.sliding_window is not None:
            # Built here when the metadata was made for a kernel that needs none (for a layer that kernel
            # cannot run), or to narrow it to the window.
            # (over the block tables' whole width, not the longest sequence: no host sync, static under compile)
            lens = group.seq_lens[:, None, None, None]
            width = group.block_tables.shape[1] * kv_cache.shape[2] if mask is None else mask.shape[-1]
            span = torch.arange(width, device=q.device)
            mask = span < lens
            if self.sliding_window is not None:
                mask = mask & (span >= lens - self.sliding_window)
        max_len = mask.shape[-1]
        keys = kv_cache[0][group.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :max_len]
        values = kv_cache[1][group.block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)[:, :max_len]
        out = self._attend(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), mask, sinks)  # [B, Hq, 1, D]
        return out.reshape(num_seqs, -1)

    def _sequence(self, q: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
                  mask: torch.Tensor | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """One sequence's q_len new tokens [Q, Hq, D], the last of its seq_len positions, over its blocks;
        mask [Q, S] or None (plain causal)."""
        q_len = q.shape[0]
        shape = (-1, self.num_kv_heads, self.head_dim)
        keys = kv_cache[0][block_ids].view(shape)[:seq_len].transpose(0, 1)     # [Hkv, S, D]
        values = kv_cache[1][block_ids].view(shape)[:seq_len].transpose(0, 1)
        if not self.plain:
            query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            key_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = key_pos <= query_pos
            if self.sliding_window is not None:
                mask = mask & (key_pos > query_pos - self.sliding_window)
        out = self._attend(q.transpose(0, 1)[None], keys[None], values[None], mask, sinks)  # [1, Hq, Q, D]
        return out[0].transpose(0, 1).reshape(q_len, -1)

    def _varlen(self, q: torch.Tensor, kv_cache: torch.Tensor, v: _Varlen, sinks: torch.Tensor | None
                ) -> torch.Tensor:
        """A step described for a varlen kernel, one sequence at a time (a layer that kernel cannot run)."""
        starts, lens = v.query_start_loc.tolist(), v.seq_lens.tolist()
        block_size = kv_cache.shape[2]
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for s, seq_len in enumerate(lens):
            a, b = starts[s], starts[s + 1]
            block_ids = v.block_tables[s, :-(-seq_len // block_size)].long()
            out[a:b] = self._sequence(q[a:b], kv_cache, block_ids, seq_len, None, sinks)
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                sinks: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T * scale) v with the layer's extras: q [B, Hq, Q, D], keys and values [B, Hkv, S, D],
        mask bool broadcast to [B, Hq, Q, S] (None: causal, aligned to the end; plain layers only)
        -> [B, Hq, Q, D]."""
        gqa = self.num_heads != self.num_kv_heads
        if self.plain:
            # enable_gqa: each kv head serves its query-head group inside the kernel (bit-identical to
            # repeating the kv heads, ~15% faster on CPU at SmolLM2's 9:3 heads, no copies).
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.scale, enable_gqa=gqa)
        if gqa:
            group = self.num_heads // self.num_kv_heads
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        keys_t = keys.float().transpose(-1, -2)
        out = torch.empty_like(q)
        # Query rows a slice at a time, so the fp32 scores of a long prompt stay near 64 MiB.
        rows = max(1, (1 << 24) // (q.shape[0] * q.shape[1] * keys.shape[2]))
        for a in range(0, q.shape[2], rows):
            scores = torch.matmul(q[:, :, a:a + rows].float(), keys_t) * self.scale
            if self.logits_soft_cap is not None:
                scores = torch.tanh(scores / self.logits_soft_cap) * self.logits_soft_cap
            scores = scores.masked_fill(~mask[..., a:a + rows, :], float("-inf"))
            if sinks is not None:
                sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
                probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
            else:
                probs = torch.softmax(scores, dim=-1)
            out[:, :, a:a + rows] = torch.matmul(probs.to(values.dtype), values)
        return out
