"""The C++ CPU kernels against the torch computations they replace."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plexus.envs import cache_dir
from plexus.models.layers.attention import AttentionMetadata, TorchPagedAttention
from plexus.models.layers.ops import rotate_half
from plexus.platforms.cpu import kernels

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler to build the CPU kernels")


def test_kernels_build():
    assert kernels.load(cache_dir()), "the CPU kernels failed to build; see the warning logged above"


kernels.load(cache_dir())
from plexus.platforms.cpu.ops import CpuModelOps, CpuPagedAttention  # noqa: E402  (needs the loaded ops)

ops = CpuModelOps()

DTYPES = [torch.float32, torch.bfloat16]


def _close(actual, expected, dtype):
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not kernels.fast_linear_available(), reason="needs avx512_bf16")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("n,k", [(960, 576), (13, 40), (6, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_bf16_matches_fp32_matmul(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())   # exact products, fp32 sums
    out = torch.ops.plexus.linear_bf16(x, w, b, True)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out, expected, atol=1e-3 * k ** 0.5, rtol=1e-4)
    assert torch.equal(ops.linear(x, w, b), out.bfloat16())                # bf16 output = rounded fp32


@pytest.mark.parametrize("m", [1, 5, 64])
def test_linear_with_prepacked_weights(m):
    """Whichever path serves m rows (GEMV, oneDNN prepacked), the result is the bf16 matmul's."""
    g = torch.Generator().manual_seed(m)
    x, w, b = (torch.randn(*shape, generator=g).bfloat16() for shape in ((m, 576), (960, 576), (960,)))
    packed = kernels.pack_weight(w)
    assert packed is not None
    expected = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(ops.linear(x, w, b, packed).float(), expected, atol=0.1, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 40])     # 40: the vector loop and its scalar tail
def test_norms_match_hf_formula(dtype, hidden):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=g).to(dtype)
    r = torch.randn(5, hidden, generator=g).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)

    def hf(h):
        hf32 = h.float()
        return w * (hf32 * torch.rsqrt(hf32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    _close(ops.rms_norm(x, w, 1e-5), hf(x), dtype)
    residual = r.clone()
    out, new_residual = ops.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(new_residual, r + x)
    _close(out, hf(r + x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 20])
def test_silu_and_mul(dtype, inter):
    x = torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    _close(ops.silu_and_mul(x), F.silu(gate) * up, dtype)


def test_silu_and_mul_over_the_whole_float_range():
    """The kernel's own exp: about an ulp from torch's where e^-x is a normal float, and the limits beyond."""
    gate = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([-1e30, 1e30, 0.0, -0.0])])
    x = torch.cat([gate, torch.ones_like(gate)])[None]
    out = torch.ops.plexus.silu_and_mul(x)[0]
    torch.testing.assert_close(out, F.silu(gate), rtol=4e-7, atol=1e-30)


def _cache(num_blocks, block_size, hkv, d, dtype, seed=2):
    return torch.randn(2, num_blocks, block_size, hkv, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, r", [(32, 32), (64, 64), (24, 24), (64, 48), (128, 96), (32, 16)])
def test_rope_and_cache(dtype, d, r):
    """r < d: a partial rotary embedding (Phi-4-mini's 3/4), the first r dims of each head rotated, the rest
    copied (HF's apply_rotary_pos_emb on q[..., :r]). 24 and 48: the scalar loop too."""
    hq, hkv, block_size = 6, 2, 4
    t = 7
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    positions = torch.tensor([0, 1, 2, 9, 3, 4, 17])
    slots = torch.tensor([5, 6, 7, 8, 20, 21, 22])
    freqs = torch.arange(32)[:, None] * (1.0 / 10000 ** (torch.arange(0, r, 2) / r))[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    cache = torch.zeros(2, 8, block_size, hkv, d, dtype=dtype)
    q = torch.ops.plexus.rope_and_cache(qkv, positions, cos, sin, cache, slots, hq, hkv, d)

    qr, kr, vr = qkv.float().split([hq * d, hkv * d, hkv * d], -1)
    c, s = cos[positions][:, None], sin[positions][:, None]

    def rotated(x):
        return torch.cat([x[..., :r] * c + rotate_half(x[..., :r]) * s, x[..., r:]], dim=-1)

    q_ref, k_ref = rotated(qr.view(t, hq, d)), rotated(kr.view(t, hkv, d))
    _close(q, q_ref, dtype)
    _close(cache[0].view(-1, hkv, d)[slots], k_ref, dtype)
    assert torch.equal(cache[1].view(-1, hkv, d)[slots], vr.view(t, hkv, d).to(dtype))
    untouched = torch.ones(cache[0].view(-1, hkv, d).shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert not cache[:, :, :].view(2, -1, hkv, d)[:, untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (6, 2, 24)])
def test_decode_attention_matches_sdpa_path(dtype, hq, hkv, d):
    """Mixed steps (decodes and prefill chunks with cached prefixes): the decode kernel against the
    torch decode path, with the same per-chunk prefill attention in both."""
    block_size, num_blocks = 4, 40
    cache = _cache(num_blocks, block_size, hkv, d, dtype)
    rng = np.random.default_rng(0)
    query_lens = [1, 5, 1, 1, 3, 1, 1]
    seq_lens = [9, 5, 17, 1, 12, 30, 45]     # 45: two full sixteen-key chunks and a tail
    perm = rng.permutation(num_blocks).tolist()
    block_ids, used = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        block_ids.append(perm[used:used + n])
        used += n
    q = torch.randn(sum(query_lens), hq, d, generator=torch.Generator().manual_seed(4)).to(dtype)
    attn = CpuPagedAttention(hq, hkv, d, d ** -0.5)
    torch_attn = TorchPagedAttention(hq, hkv, d, d ** -0.5)
    mixed = AttentionMetadata.build(query_lens, seq_lens, block_ids, block_size, torch.device("cpu"),
                                    use_decode_kernel=True)
    reference = AttentionMetadata.build(query_lens, seq_lens, block_ids, block_size, torch.device("cpu"),
                                        use_decode_kernel=False)
    assert mixed.decode.mask is None and reference.decode.mask is not None and len(mixed.prefills) == 2
    _close(attn(q, cache, mixed), torch_attn(q, cache, reference), dtype)

    only_decodes = AttentionMetadata.build([1, 1], [30, 2], [block_ids[5], block_ids[0]], block_size,
                                           torch.device("cpu"), use_decode_kernel=True)
    assert not only_decodes.prefills
    ref = AttentionMetadata.build([1, 1], [30, 2], [block_ids[5], block_ids[0]], block_size, torch.device("cpu"),
                                  use_decode_kernel=False)
    _close(attn(q[:2], cache, only_decodes), torch_attn(q[:2], cache, ref), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 4, 128), (6, 2, 24)])
@pytest.mark.parametrize("window", [1, 7, 16, 100])
def test_decode_attention_kernel_over_a_sliding_window(dtype, hq, hkv, d, window):
    """The kernel called directly, against the window written out here: the query at position len - 1
    attends the last `window` positions (HF's rule kv > q - window), softmax in fp32."""
    block_size, seq_lens = 4, [1, 9, 30, 45]
    tables = torch.arange(4 * 12).view(4, 12).flip(1)    # blocks in reverse order, so tables matter
    cache = _cache(48, block_size, hkv, d, dtype)
    q = torch.randn(len(seq_lens), hq, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    scale = d ** -0.5
    out = torch.ops.plexus.paged_attention_decode(q, cache, tables, torch.tensor(seq_lens), scale, window)
    for b, n in enumerate(seq_lens):
        pos = torch.arange(max(0, n - window), n)
        rows = tables[b, pos // block_size] * block_size + pos % block_size
        k = cache[0].reshape(-1, hkv, d)[rows].float().repeat_interleave(hq // hkv, dim=1)   # [S, Hq, D]
        v = cache[1].reshape(-1, hkv, d)[rows].float().repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,shd->hs", q[b].float(), k) * scale, dim=-1)
        _close(out[b], torch.einsum("hs,shd->hd", p, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_sample_is_argmax_and_its_logprob(dtype):
    logits = (torch.randn(5, 49152 + 7, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    logits[2, 100] = logits[2, 4000] = logits[2].max() + 1      # a tie: the first index wins, as in argmax
    ids, logprobs = torch.ops.plexus.greedy_sample(logits)
    assert ids.tolist() == logits.argmax(dim=-1).tolist() and ids[2] == 100
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
