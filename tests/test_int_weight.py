"""The one matmul behind every packed-integer format (AWQ, GPTQ, compressed-tensors): IntWeight, against
w = (q - z) * s written out here, on each of its paths: torch's int4 and int8 kernels (called for short
bf16 steps), the dequantizing fallback (long steps, fp32) from the plain or the packed form, and act-order
shards with their own column order. (The CPU platform's decode kernel for the packed form is held to the
same formula in test_quant_kernels.py.)"""
from __future__ import annotations

import pytest
import torch

from plexus.models.quantization.int_weight import INT4PACK_MAX_ROWS, IntWeight, unpack_int32


def _reference(q, scales, zeros, g_idx):
    """w[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]"""
    return (q.float() - zeros[:, g_idx]) * scales[:, g_idx]


def _random(n, k, bits, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    q = torch.randint(0, 1 << bits, (n, k), generator=g).to(torch.uint8)
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).float()
    return q, scales, zeros


@pytest.mark.parametrize("bits, group_size, n, kind", [
    (4, 64, 96, "int4pack"), (4, 256, 96, "int4pack"), (4, 64, 90, "packed"), (8, 256, 96, "int8pack"),
    (8, 64, 96, "packed"), (8, 32, 96, "packed"), (2, 64, 96, "dequant")])
def test_every_path_computes_x_times_the_dequantized_weight(bits, group_size, n, kind):
    k = 256
    q, scales, zeros = _random(n, k, bits, group_size)
    weight = IntWeight(q, scales, zeros, bits, group_size, [n])
    assert [s.kind for s in weight.segments] == [kind]
    w = _reference(q, scales, zeros, torch.arange(k) // group_size)
    torch.testing.assert_close(weight.dequantize(), w, rtol=1e-6, atol=1e-6)
    for rows, dtype, tol in [(1, torch.bfloat16, 2e-2), (INT4PACK_MAX_ROWS, torch.bfloat16, 2e-2),
                             (INT4PACK_MAX_ROWS + 1, torch.bfloat16, 2e-2), (3, torch.float32, 1e-5),
                             (300, torch.float32, 1e-5)]:
        x = torch.randn(rows, k)
        expected = x @ w.T
        got = weight(x.to(dtype)).float()
        assert ((got - expected).norm() / expected.norm()) < tol, (rows, dtype)


def test_the_int4_kernel_itself_matches_the_formula():
    """_weight_int4pack_mm_for_cpu as IntWeight feeds it: (q - 8) * s + (8 - z) * s per group."""
    n, k, gs = 64, 128, 32
    q, scales, zeros = _random(n, k, 4, gs, seed=3)
    segment = IntWeight(q, scales, zeros, 4, gs, [n]).segments[0]
    x = torch.randn(5, k, dtype=torch.bfloat16)
    got = torch._weight_int4pack_mm_for_cpu(x, segment.qweight, gs, segment.scales_zeros.to(torch.bfloat16))
    expected = x.float() @ _reference(q, scales, zeros, torch.arange(k) // gs).T
    assert ((got.float() - expected).norm() / expected.norm()) < 1e-2


def test_act_order_shards_each_keep_their_own_column_order():
    """A fused q/k/v whose shards were quantized with different act-order permutations."""
    k, gs, sizes = 128, 32, [64, 32, 32]
    n = sum(sizes)
    q, scales, zeros = _random(n, k, 4, gs, seed=1)
    g = torch.Generator().manual_seed(2)
    g_idx = [torch.randperm(k, generator=g) // gs for _ in sizes]     # each group still has gs columns
    g_idx[2] = g_idx[1].clone()                                          # k and v share one: one segment
    weight = IntWeight(q, scales, zeros, 4, gs, sizes, [gi.int() for gi in g_idx])
    assert len(weight.segments) == 2
    rows = torch.split(torch.arange(n), sizes)
    w = torch.cat([_reference(q[r], scales[r], zeros[r], gi.long()) for r, gi in zip(rows, g_idx)])
    torch.testing.assert_close(weight.dequantize(), w, rtol=1e-6, atol=1e-6)
    x = torch.randn(4, k)
    for dtype, tol in [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)]:
        got = weight(x.to(dtype)).float()
        assert ((got - x @ w.T).norm() / (x @ w.T).norm()) < tol


def test_unpack_int32_reads_lowest_bits_first():
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_int32(word, 4, dim=1).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert unpack_int32(torch.tensor([[-1]], dtype=torch.int32), 8, dim=0).flatten().tolist() == [255] * 4
