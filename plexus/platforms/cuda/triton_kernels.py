"""Triton kernels of the CUDA platform: the rotary embedding fused with the KV-cache write, split-K paged decode
attention and varlen paged prefill attention, with thin launch wrappers.

The cache of one layer is [2, num_blocks, block_size, num_kv_heads, head_dim] (keys, values); a token at slot s
lives at block s // block_size, offset s % block_size. Every kernel reads keys and values through the block
tables, one token tile at a time (each token's block id is looked up in the table, so a tile may span several
blocks and block_size need not be a power of two). Query head h reads kv head h // (num_heads // num_kv_heads);
the attention kernels give one program all the query heads of a kv head (packed into the rows of one tl.dot,
padded to at least 16), so each key and value is read once per kv head, not once per query head.

The wrappers never read tensor values on the host (no .item(), no .tolist(), no synchronisation): grids come
from tensor shapes and Python ints only, so they can be captured into CUDA graphs. Scores, softmax and
accumulators are fp32; the dots take the model dtype's operands (fp32 ones at full precision, never tf32).

Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on CPU tensors; the tests
run them that way on machines without a GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _unit_stride(table: torch.Tensor) -> torch.Tensor:
    """A block table whose rows may be strided but whose entries are adjacent (no copy when they are)."""
    return table if table.stride(-1) == 1 else table.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands at full precision (tl.dot would round them to tf32); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------------------------
# Rotary embedding + cache write
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, cache_ptr,
    stride_qkv_t, stride_cos, stride_sin, stride_qo_t, stride_qo_h,
    stride_c_kv, stride_c_blk, stride_c_off, stride_c_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program per (token, tile of BLOCK_H heads of the row's q | k | v heads). q and k heads are rotated
    (rotate-half form, cos/sin rounded to the model dtype first, as the torch reference does, then fp32 math
    rounded once); q goes to q_out, k and v to the token's cache slot (no write for a negative slot)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    TOTAL: tl.constexpr = NUM_HEADS + 2 * NUM_KV_HEADS
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF
    hmask = heads < TOTAL
    mask = hmask[:, None] & dmask[None, :]

    x_ptrs = qkv_ptr + t * stride_qkv_t + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
    dtype = x1.dtype

    pos = tl.load(pos_ptr + t).to(tl.int64)
    c1 = tl.load(cos_ptr + pos * stride_cos + offs, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + offs, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_sin + offs, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + offs, mask=dmask, other=0.0).to(dtype).to(tl.float32)

    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    is_v = (heads >= NUM_HEADS + NUM_KV_HEADS)[:, None]
    o1 = tl.where(is_v, x1f, x1f * c1[None, :] - x2f * s1[None, :]).to(dtype)
    o2 = tl.where(is_v, x2f, x2f * c2[None, :] + x1f * s2[None, :]).to(dtype)

    # Query heads -> q_out[t, h].
    q_mask = (heads < NUM_HEADS)[:, None] & mask
    q_ptrs = q_out_ptr + t * stride_qo_t + heads[:, None] * stride_qo_h + offs[None, :]
    tl.store(q_ptrs, o1, mask=q_mask)
    tl.store(q_ptrs + HALF, o2, mask=q_mask)

    # Key and value heads -> their cache slot.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    kv_idx = tl.where(heads >= NUM_HEADS + NUM_KV_HEADS, 1, 0)
    kv_head = heads - NUM_HEADS - kv_idx * NUM_KV_HEADS
    first_cache_head = tl.where(slot >= 0, NUM_HEADS, TOTAL)                # none for a negative slot
    c_mask = (heads >= first_cache_head)[:, None] & mask
    c_ptrs = (cache_ptr + blk * stride_c_blk + off * stride_c_off
              + (kv_idx.to(tl.int64) * stride_c_kv + kv_head * stride_c_head)[:, None] + offs[None, :])
    tl.store(c_ptrs, o1, mask=c_mask)
    tl.store(c_ptrs + HALF, o2, mask=c_mask)


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int) -> torch.Tensor:
    """ModelOps.rope_and_cache in one kernel: rotates q and k of the fused rows qkv [T, (Hq + 2 Hkv) * D] (row
    stride may exceed the width; last-dim stride 1) at `positions` with the fp32 tables cos/sin
    [max_positions, D], writes k and v to the cache slots slot_mapping [T] (a negative slot is skipped) and
    returns the rotated q as a new [T, Hq, D] tensor in qkv's dtype."""
    num_tokens = qkv.shape[0]
    assert qkv.dim() == 2 and qkv.stride(-1) == 1, "qkv must be [T, W] with a unit last-dim stride"
    assert qkv.shape[1] >= (num_heads + 2 * num_kv_heads) * head_dim and head_dim % 2 == 0
    assert kv_cache.dim() == 5 and kv_cache.stride(-1) == 1 and kv_cache.dtype == qkv.dtype
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q_out
    block_half = _next_pow2(head_dim // 2)
    total_heads = num_heads + 2 * num_kv_heads
    block_h = min(_next_pow2(total_heads), max(1, 2048 // block_half))
    grid = (num_tokens, triton.cdiv(total_heads, block_h))
    _rope_and_cache_kernel[grid](
        qkv, positions, cos, sin, slot_mapping, q_out, kv_cache,
        qkv.stride(0), cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_HALF=block_half, BLOCK_H=block_h, num_warps=4)
    return q_out


# ---------------------------------------------------------------------------------------------------------------
# Paged decode attention: split-K over partitions of the context, then a reduce
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _decode_partition_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, out_ptr, tmp_out_ptr, max_logits_ptr, exp_sums_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_c_kv, stride_c_blk, stride_c_off, stride_c_head, stride_bt,
    NUM_PARTITIONS,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (sequence, kv head, partition): the GROUP query heads of the kv head (rows of the dots,
    padded to BLOCK_G) over the partition's tokens, BLOCK_N at a time, with an online softmax (log2 domain).
    SINGLE: the only partition, write the normalised output; else the partial max, sum of exponentials and
    unnormalised weighted values for the reduce (a partition past the sequence's end writes max -inf, sum 0)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    start = part * PARTITION_SIZE
    end = tl.minimum(seq_len, start + PARTITION_SIZE)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    b64 = b.to(tl.int64)

    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    k_base = cache_ptr + kvh.to(tl.int64) * stride_c_head
    v_base = k_base + stride_c_kv
    bt_row = bt_ptr + b64 * stride_bt
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + offs_n
        tmask = toks < end
        blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        rows = blk * stride_c_blk + (toks % BLOCK_SIZE) * stride_c_off
        k = tl.load(k_base + rows[None, :] + offs_d[:, None], mask=tmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2          # [BLOCK_G, BLOCK_N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] + offs_d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SINGLE:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)                                # a zero-length (padding) row
        out = acc / l_safe[:, None]
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        idx = (b64 * NUM_HEADS + heads) * NUM_PARTITIONS + part              # [B, Hq, P]
        tl.store(max_logits_ptr + idx, m_i, mask=gmask)
        tl.store(exp_sums_ptr + idx, l_i, mask=gmask)
        # The reduce reads the weighted values of non-empty partitions only.
        d_lim = tl.where(end > start, HEAD_DIM, 0)
        tl.store(tmp_out_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=gmask[:, None] & (offs_d < d_lim)[None, :])


@triton.jit
def _decode_reduce_kernel(
    out_ptr, tmp_out_ptr, max_logits_ptr, exp_sums_ptr, seq_lens_ptr,
    stride_ob, stride_oh, NUM_PARTITIONS,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program per (sequence, query head): combines the partials of the sequence's non-empty partitions."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    num_valid = tl.minimum(tl.cdiv(seq_len, PARTITION_SIZE), NUM_PARTITIONS)
    base = (b.to(tl.int64) * NUM_HEADS + h) * NUM_PARTITIONS
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    m_vec = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    for p0 in range(0, num_valid, BLOCK_P):
        ps = p0 + offs_p
        m_vec = tl.maximum(m_vec, tl.load(max_logits_ptr + base + ps, mask=ps < num_valid, other=float("-inf")))
    m_max = tl.max(m_vec, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)                     # a zero-length (padding) row

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    l_vec = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, num_valid, BLOCK_P):
        ps = p0 + offs_p
        pmask = ps < num_valid
        w = tl.exp2(tl.load(max_logits_ptr + base + ps, mask=pmask, other=float("-inf")) - m_max)
        l_vec += w * tl.load(exp_sums_ptr + base + ps, mask=pmask, other=0.0)
        o = tl.load(tmp_out_ptr + (base + ps)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=pmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    denom = tl.sum(l_vec, 0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
             (acc / denom).to(out_ptr.dtype.element_ty), mask=dmask)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_kv_heads: int,
                           partition_size: int = 512) -> torch.Tensor:
    """One new query per sequence, q [B, Hq, D], at position seq_len - 1, over keys and values 0..seq_len-1 read
    through block_tables [B, max_blocks] (int32/int64, padded with any valid block id) from the cache
    [2, num_blocks, block_size, Hkv, D]. Split-K: the context of block_tables.shape[1] * block_size tokens is cut
    into partitions of partition_size tokens (a multiple of block_size), one program per (sequence, kv head,
    partition), then a reduce kernel (skipped when there is one partition). Returns [B, Hq, D] in q's dtype;
    a sequence of length 0 (graph padding) gets zeros."""
    num_seqs, num_heads, head_dim = q.shape
    block_size = kv_cache.shape[2]
    assert kv_cache.dim() == 5 and kv_cache.shape[3] == num_kv_heads and kv_cache.shape[4] == head_dim
    assert kv_cache.stride(-1) == 1 and kv_cache.dtype == q.dtype
    assert num_heads % num_kv_heads == 0 and partition_size % block_size == 0
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables, seq_lens = _unit_stride(block_tables), seq_lens.contiguous()
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    num_partitions = max(1, triton.cdiv(block_tables.shape[1] * block_size, partition_size))
    single = num_partitions == 1
    block_d = max(16, _next_pow2(head_dim))
    # Tiles of 64 tokens (fp16/bf16) or 32 (fp32, whose full-precision dots are FMA loops that need more
    # registers; 8 warps then): no register spills for head_dim <= 128 (ptxas, sm_90).
    fp32 = q.dtype == torch.float32
    block_n = 16
    for n in ((32, 16) if fp32 or head_dim > 128 else (64, 32, 16)):
        if partition_size % n == 0:
            block_n = n
            break
    num_warps = 8 if fp32 or head_dim > 128 else 4
    if single:
        tmp_out = max_logits = exp_sums = out       # unused
    else:
        max_logits = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32, device=q.device)
        exp_sums = torch.empty_like(max_logits)
        tmp_out = torch.empty(num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32, device=q.device)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, kv_cache, block_tables, seq_lens, out, tmp_out, max_logits, exp_sums,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        num_partitions,
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, PARTITION_SIZE=partition_size,
        BLOCK_G=max(16, _next_pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n, SINGLE=single,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=2)
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, tmp_out, max_logits, exp_sums, seq_lens, out.stride(0), out.stride(1), num_partitions,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, PARTITION_SIZE=partition_size, BLOCK_D=block_d,
            BLOCK_P=min(32, _next_pow2(num_partitions)), num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Varlen paged prefill attention (chunked prefill over a cached prefix, mixed with decode rows)
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _prefill_tile(q, acc, m_i, l_i, qpos, k_base, v_base, bt_row, n0, kv_end, scale_log2,
                  offs_n, offs_d, dmask, stride_c_blk, stride_c_off,
                  BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of BLOCK_N keys at positions n0.. into the online softmax. MASKED: the tile may hold keys past
    kv_end or past a row's own position (the causal diagonal); else every key is visible to every row."""
    toks = n0 + offs_n
    if MASKED:
        tmask = toks < kv_end
        blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + toks // BLOCK_SIZE).to(tl.int64)
    rows = blk * stride_c_blk + (toks % BLOCK_SIZE) * stride_c_off
    if MASKED:
        k = tl.load(k_base + rows[None, :] + offs_d[:, None], mask=tmask[None, :] & dmask[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] + offs_d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
    else:
        k = tl.load(k_base + rows[None, :] + offs_d[:, None], mask=dmask[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] + offs_d[None, :], mask=dmask[None, :], other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2             # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where((toks[None, :] <= qpos[:, None]) & tmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, bt_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_blk, stride_c_off, stride_c_head, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (sequence, kv head, tile of BLOCK_M rows), a row being a (new token, query head of the
    kv head) pair: row r is token r // GROUP, head kvh * GROUP + r % GROUP. The sequence's q_len new tokens
    are its last positions; a row at position p sees keys 0..p. Keys before the tile's first token's position
    are visible to every row (no mask); the tiles from there to the last row's position are masked."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    if row0 >= q_len * GROUP:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = seq_len - q_len

    rows = row0 + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    heads = kvh * GROUP + rows % GROUP
    rmask = tok < q_len
    qpos = prefix + tok
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_DIM
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = cache_ptr + kvh.to(tl.int64) * stride_c_head
    v_base = k_base + stride_c_kv
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

    tok_first = row0 // GROUP
    tok_last = tl.minimum(q_len - 1, (row0 + BLOCK_M - 1) // GROUP)
    full_end = ((prefix + tok_first + 1) // BLOCK_N) * BLOCK_N              # keys every row sees
    kv_end = prefix + tok_last + 1                                          # keys any row sees
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, qpos, k_base, v_base, bt_row, n0, kv_end, scale_log2,
                                      offs_n, offs_d, dmask, stride_c_blk, stride_c_off,
                                      BLOCK_SIZE, False, DOT_PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, qpos, k_base, v_base, bt_row, n0, kv_end, scale_log2,
                                      offs_n, offs_d, dmask, stride_c_blk, stride_c_off,
                                      BLOCK_SIZE, True, DOT_PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + tok64[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_kv_heads: int,
                            max_query_len: int) -> torch.Tensor:
    """Varlen attention of the new tokens q [T, Hq, D] of S sequences packed back to back (query_start_loc
    [S+1] int32, cumulative), sequence s's q_len new tokens being its last positions seq_len - q_len ..
    seq_len - 1 (seq_lens [S]), already in the cache: a query at position p attends keys 0..p, all read through
    block_tables [S, max_blocks]. max_query_len (a Python int, at least every q_len) sizes the grid only.
    Returns [T, Hq, D] in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    assert kv_cache.dim() == 5 and kv_cache.shape[3] == num_kv_heads and kv_cache.shape[4] == head_dim
    assert kv_cache.stride(-1) == 1 and kv_cache.dtype == q.dtype and num_heads % num_kv_heads == 0
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables = _unit_stride(block_tables)
    query_start_loc, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    group = num_heads // num_kv_heads
    block_d = max(16, _next_pow2(head_dim))
    # Tiles without register spills on sm_90 (ptxas): fp16/bf16 128 x 64 (wgmma) for head_dim <= 128, 64 x 32
    # above; fp32 (full-precision dots: FMA loops) 64 x 16 up to head_dim 64, 32 x 16 above. Short steps
    # (decode rows, small chunks) take the smallest power of two >= 16 rows that holds them.
    if q.dtype == torch.float32:
        max_m, block_n = (64 if block_d <= 64 else 32), 16
    else:
        max_m, block_n = (128, 64) if head_dim <= 128 else (64, 32)
    block_m = min(max_m, max(16, _next_pow2(max_query_len * group)))
    num_warps = 8 if block_m >= 64 or (q.dtype == torch.float32 and block_m >= 32) else 4
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len * group, block_m))
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=2)
    return out
