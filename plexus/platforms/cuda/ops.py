"""The model's ops on the CUDA platform: the rotary embedding and the KV-cache write in one Triton kernel,
W8A8 matmuls on the GPU's int8 tensor cores (torch._int_mm) and fp8 ones on its fp8 tensor cores
(torch._scaled_mm). Norms, SiLU and dense matmuls stay torch's
(cuBLAS and fused elementwise kernels, captured into CUDA graphs with the rest of a decode step)."""
from __future__ import annotations

import torch

from plexus.models.layers.ops import ModelOps

# torch._int_mm on CUDA wants more than 16 rows and both matrix widths a multiple of 8.
_INT_MM_MIN_ROWS = 17
FP8_MAX = 448.0


class CudaModelOps(ModelOps):
    def rope_and_cache(self, qkv, positions, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
        from plexus.platforms.cuda import triton_kernels

        if qkv.stride(-1) != 1 or not kv_cache.is_contiguous() or cos.shape[-1] != head_dim:
            return super().rope_and_cache(qkv, positions, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads,
                                          head_dim)
        return triton_kernels.rope_and_cache(qkv, positions, cos, sin, kv_cache, slot_mapping, num_heads,
                                             num_kv_heads, head_dim)

    def int_linear(self, x, form, bias, fallback, silu_and_mul=False):
        """A dynamic W8A8 layer (form.w8a8): x rounded to int8 per token, int8 x int8 -> int32 on the tensor cores
        (torch._int_mm, its weight operand [K, N] column-major as a view), both scales after; every other
        integer form runs its method's path (tinygemm for 4-bit, dequantize-and-matmul)."""
        from plexus.models.quantization.int8 import quantize_per_token

        n, k = form.shape
        if not (form.w8a8 and x.is_cuda and n % 8 == 0 and k % 8 == 0
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
            return super().int_linear(x, form, bias, fallback, silu_and_mul)
        rows = x.reshape(-1, k)
        m = rows.shape[0]
        q, scale = quantize_per_token(rows)
        if m < _INT_MM_MIN_ROWS:
            q = torch.nn.functional.pad(q, (0, 0, 0, _INT_MM_MIN_ROWS - m))
        y = torch._int_mm(q, form.qweight.t())[:m].float() * scale * form.scales
        y = y.to(x.dtype).view(*x.shape[:-1], n)
        y = y if bias is None else y + bias
        return self.silu_and_mul(y) if silu_and_mul else y

    def fp8_linear(self, x, weight, weight_scale, bias, input_scale, fallback):
        """torch._scaled_mm on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper): x rounded to
        e4m3 per token (or on the static input_scale), the per-channel weight scales applied in the epilogue."""
        k = x.shape[-1]
        n = weight.shape[0]
        if (not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 9) or k % 16 or n % 16
                or x.dtype not in (torch.bfloat16, torch.float16)):
            return fallback(x)
        rows = x.reshape(-1, k).float()
        if input_scale is None:
            scale = (rows.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        else:
            scale = input_scale.float().reshape(1, 1).expand(rows.shape[0], 1)
        q = (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(q, weight.t(), scale_a=scale.contiguous(), scale_b=weight_scale.view(1, n).float(),
                             bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
        return y.view(*x.shape[:-1], n)
