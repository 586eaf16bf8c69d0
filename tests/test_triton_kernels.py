"""The CUDA platform's Triton kernels (plexus/platforms/cuda/triton_kernels.py) against torch references written
here: paged decode attention (split-K and single partition), varlen paged prefill attention over cached prefixes,
and the rotary embedding + cache write.

Without a GPU the kernels run under Triton's interpreter (tests/triton_interpret.py says how)."""
from __future__ import annotations

import pytest
import torch
from triton_interpret import INTERPRET as _INTERPRET
from triton_interpret import interpreting
from triton_interpret import kernels as tk

from plexus.models.layers.ops import ModelOps


DEVICE = "cpu" if _INTERPRET else "cuda"

needs_cuda_bf16 = pytest.mark.skipif(_INTERPRET, reason="bf16 needs a GPU: Triton's interpreter computes bf16 wrongly")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda_bf16)]
# Measured max abs errors against the fp64 references (interpreter, CPU): fp32 attention <= 1.2e-6, fp32 rope 0
# (bitwise, also vs ModelOps); fp16 attention <= 1.0e-3 (probabilities rounded to fp16 for the P @ V dot, as in
# flash attention), fp16 rope vs the once-rounded fp32 formula 0, vs ModelOps (rounding every fp16 op) <= 1 ulp.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
       torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2}}


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """The interpreter (without a GPU) while this file's tests run: launches read TRITON_INTERPRET and import
    more of triton lazily."""
    with interpreting():
        yield


@pytest.fixture
def device():
    return DEVICE


# --------------------------------------------------------------------------------------------------------------
# helpers and references
# --------------------------------------------------------------------------------------------------------------

def _paged_setup(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, gen, table_dtype=torch.int32,
                 extra_blocks=5, pad_cols=1):
    """A random cache and block tables giving each sequence its own shuffled, non-contiguous blocks; tables are
    padded with block 0 (a valid id) past each sequence's blocks, pad_cols columns wider than needed."""
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    ids = torch.randperm(num_blocks, generator=gen)
    width = max(need) + pad_cols
    tables = torch.zeros(len(seq_lens), width, dtype=table_dtype)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[used:used + n]
        used += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    return cache.to(device), tables.to(device)


def _gather(cache, table, length):
    """Keys and values [length, Hkv, D] of one sequence, token by token through its block table, in fp64."""
    bs = cache.shape[2]
    keys = torch.stack([cache[0, int(table[p // bs]), p % bs] for p in range(length)])
    values = torch.stack([cache[1, int(table[p // bs]), p % bs] for p in range(length)])
    return keys.double(), values.double()


def _ref_attention(q, keys, values, positions, scale):
    """fp64 softmax attention: q [n, Hq, D] at `positions` [n] over keys/values [L, Hkv, D], key j visible to a
    query at position p when j <= p; query head h reads kv head h // (Hq // Hkv)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,jhd->nhj", q.double(), k) * scale
    visible = torch.arange(keys.shape[0])[None, :] <= torch.as_tensor(positions)[:, None]     # [n, L]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("nhj,jhd->nhd", scores.softmax(-1), v)


def _assert_close(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), **TOL[dtype])


# --------------------------------------------------------------------------------------------------------------
# paged decode attention
# --------------------------------------------------------------------------------------------------------------

def _check_decode(seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, partition_size, block_size=16,
                  table_dtype=torch.int32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache, tables = _paged_setup(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, gen, table_dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    lens = torch.tensor(seq_lens, dtype=table_dtype, device=device)
    scale = head_dim ** -0.5
    out = tk.paged_decode_attention(q, cache, tables, lens, scale, num_kv_heads, partition_size=partition_size)
    assert out.shape == q.shape
    for b, n in enumerate(seq_lens):
        keys, values = _gather(cache.cpu(), tables[b].cpu(), n)
        ref = _ref_attention(q[b:b + 1].cpu(), keys, values, [n - 1], scale)
        _assert_close(out[b:b + 1], ref, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 64)], ids=["gqa9x3", "mha4"])
def test_decode_split_k(dtype, heads, device):
    """Lengths around block (16) and partition (32) edges; 4 partitions of 32 tokens + the reduce kernel."""
    num_heads, num_kv_heads, head_dim = heads
    _check_decode([1, 15, 16, 17, 33, 100], num_heads, num_kv_heads, head_dim, dtype, device, partition_size=32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_single_partition(dtype, device):
    """One partition covers every context: the partition kernel writes the output, no reduce."""
    _check_decode([1, 17, 48, 100], 9, 3, 64, dtype, device, partition_size=512, table_dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_head_dim_80_small_blocks(dtype, device):
    """head_dim 80 (BLOCK_D 128, masked), block_size 8 (a token tile spans several blocks), 6 q / 3 kv heads,
    partition 48 (not a multiple of the tile: masked at the partition's end)."""
    _check_decode([3, 8, 9, 47, 49, 96], 6, 3, 80, dtype, device, partition_size=48, block_size=8,
                  table_dtype=torch.int64, seed=1)


def test_decode_zero_length_rows_give_zeros(device):
    """Padding rows of length 0 (e.g. in a CUDA graph's batch) read nothing and return zeros, not NaN."""
    gen = torch.Generator().manual_seed(2)
    cache, tables = _paged_setup([40, 5], 16, 2, 64, torch.float32, device, gen)
    q = torch.randn(3, 4, 64, generator=gen).to(device)
    tables = torch.cat([tables, torch.zeros_like(tables[:1])])
    for psize in (32, 512):
        lens = torch.tensor([40, 0, 5], dtype=torch.int32, device=device)
        out = tk.paged_decode_attention(q, cache, tables, lens, 0.125, 2, partition_size=psize)
        assert torch.equal(out[1].cpu(), torch.zeros(4, 64))
        keys, values = _gather(cache.cpu(), tables[0].cpu(), 40)
        _assert_close(out[:1], _ref_attention(q[:1].cpu(), keys, values, [39], 0.125), torch.float32)


# --------------------------------------------------------------------------------------------------------------
# varlen paged prefill attention
# --------------------------------------------------------------------------------------------------------------

def _check_prefill(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, block_size=16, seed=0,
                   max_query_len=None):
    gen = torch.Generator().manual_seed(seed)
    cache, tables = _paged_setup(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, gen, torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = tk.paged_prefill_attention(q, cache, tables, qsl, lens, scale, num_kv_heads, max_query_len or max(q_lens))
    assert out.shape == q.shape
    for s, (q_len, n) in enumerate(zip(q_lens, seq_lens)):
        keys, values = _gather(cache.cpu(), tables[s].cpu(), n)
        ref = _ref_attention(q[starts[s]:starts[s + 1]].cpu(), keys, values, list(range(n - q_len, n)), scale)
        _assert_close(out[starts[s]:starts[s + 1]], ref, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 64)], ids=["gqa9x3", "mha4"])
def test_prefill_mixed_batch(dtype, heads, device):
    """Chunks over cached prefixes, whole prompts and one-token (decode) rows of different lengths in one call.
    Prefixes of 62 and 63 put the first query's last visible key just before / at the end of a key tile (16 in
    fp32, 64 otherwise): the edge between the unmasked and the masked key loops."""
    num_heads, num_kv_heads, head_dim = heads
    _check_prefill([5, 1, 16, 33, 1, 20, 12, 4, 3], [40, 17, 16, 33, 1, 70, 100, 66, 66], num_heads, num_kv_heads,
                   head_dim, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_no_prefix(dtype, device):
    """Plain causal prefill (q_len == seq_len), several row tiles per sequence, head_dim 80, block_size 8."""
    _check_prefill([70, 3, 40], [70, 3, 40], 6, 3, 80, dtype, device, block_size=8, seed=1)


def test_prefill_decode_rows_only(device):
    """Every sequence with one new token: the prefill kernel agrees with the decode kernel. max_query_len above
    every q_len only adds row tiles that return at once."""
    seq_lens = [1, 16, 17, 50]
    out = _check_prefill([1] * 4, seq_lens, 9, 3, 64, torch.float32, device, seed=3, max_query_len=12)
    gen = torch.Generator().manual_seed(3)
    cache, tables = _paged_setup(seq_lens, 16, 3, 64, torch.float32, device, gen, torch.int32)
    q = torch.randn(4, 9, 64, generator=gen).to(device)
    dec = tk.paged_decode_attention(q, cache, tables, torch.tensor(seq_lens, device=device), 0.125, 3,
                                    partition_size=32)
    torch.testing.assert_close(out, dec, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# rotary embedding + cache write
# --------------------------------------------------------------------------------------------------------------

def _ref_rope(x, c, s):
    """Rotate-half in fp32 from the model-dtype cos/sin, rounded once by the caller: x [T, H, D], c/s [T, D]."""
    half = x.shape[-1] // 2
    x, c, s = x.float(), c.float()[:, None], s.float()[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 2, 80)], ids=["smollm", "d80"])
def test_rope_and_cache(dtype, heads, device):
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(4)
    num_tokens, block_size, num_blocks, max_pos = 7, 4, 6, 50
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width + 24, generator=gen).to(dtype).to(device)[:, :width]   # row stride > width
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(device)
    cos = torch.randn(max_pos, head_dim, generator=gen).to(device)          # random tables: every index matters
    sin = torch.randn(max_pos, head_dim, generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    before = cache.clone()

    q = tk.rope_and_cache(qkv, positions, cos, sin, cache, slots, num_heads, num_kv_heads, head_dim)

    c, s = cos[positions].to(dtype), sin[positions].to(dtype)
    q_in, k_in, v_in = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q_ref = _ref_rope(q_in.reshape(num_tokens, num_heads, head_dim), c, s)
    k_ref = _ref_rope(k_in.reshape(num_tokens, num_kv_heads, head_dim), c, s)
    assert q.shape == (num_tokens, num_heads, head_dim) and q.dtype == dtype and q.is_contiguous()
    # Bitwise under the interpreter; on a GPU a fused multiply-add may move the rounding by an ulp.
    exact = {"atol": 1e-6, "rtol": 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps}
    torch.testing.assert_close(q.float(), q_ref.to(dtype).float(), **exact)

    rows = cache.view(2, -1, num_kv_heads, head_dim)
    written = torch.zeros(rows.shape[1], dtype=torch.bool, device=device)
    written[slots] = True
    assert torch.equal(rows[:, ~written], before.view(2, -1, num_kv_heads, head_dim)[:, ~written])
    torch.testing.assert_close(rows[0, slots].float(), k_ref.to(dtype).float(), **exact)
    assert torch.equal(rows[1, slots], v_in.reshape(num_tokens, num_kv_heads, head_dim))

    # The contract of the torch op the CUDA platform replaces (which rounds every fp16 op).
    ref_cache = before.clone()
    q_ops = ModelOps().rope_and_cache(qkv, positions, cos, sin, ref_cache, slots, num_heads, num_kv_heads, head_dim)
    torch.testing.assert_close(q, q_ops, **TOL[dtype])
    torch.testing.assert_close(cache, ref_cache, **TOL[dtype])


def test_rope_negative_slot_skips_cache_write(device):
    """A slot of -1 (a padding token) writes nothing; its q is still rotated."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, (2 + 2) * 32, generator=gen).to(device)                # 2 q heads, 1 kv head, D 32
    cos, sin = torch.randn(8, 32, generator=gen).to(device), torch.randn(8, 32, generator=gen).to(device)
    cache = torch.randn(2, 2, 4, 1, 32, generator=gen).to(device)
    before = cache.clone()
    positions = torch.tensor([0, 3, 7], device=device)
    q = tk.rope_and_cache(qkv, positions, cos, sin, cache, torch.tensor([5, -1, 2], device=device), 2, 1, 32)
    rows, old = cache.view(2, 8, 32), before.view(2, 8, 32)
    keep = [i for i in range(8) if i not in (5, 2)]
    assert torch.equal(rows[:, keep], old[:, keep])
    assert torch.equal(rows[1, [5, 2]], qkv[[0, 2], 96:])                 # v: the last of q | k | v
    torch.testing.assert_close(q, _ref_rope(qkv[:, :64].view(3, 2, 32), cos[positions], sin[positions]),
                               atol=1e-6, rtol=1e-6)
