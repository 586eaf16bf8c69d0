"""The CPU platform's ops: plexus's C++ kernels (kernels/ops.cpp) behind the ModelOps interface, and the
paged attention backend whose decode reads keys through the block tables.

Each method takes the kernel where the tensors suit it (CPU, dtype, contiguity) and the pure-torch
ModelOps method otherwise, so results never depend on which served; tests/test_kernels.py holds each
kernel against the torch code it replaces."""
from __future__ import annotations

import torch

from plexus.core import sampler
from plexus.models.layers.attention import TorchPagedAttention, _DecodeGroup
from plexus.models.layers.linear import UNQUANTIZED
from plexus.models.layers.ops import ModelOps
from plexus.models.layers.recipe import LLAMA_RECIPE
from plexus.platforms.cpu import kernels

# What llama_decode_layers computes (kernels/ops.cpp): RMSNorm pre-norms, fused q/k/v with rotate-half rotary,
# causal GQA, a dense SiLU-gated MLP. Any other model runs layer by layer, through the same kernels per op.
FUSED_DECODE_RECIPES = frozenset({LLAMA_RECIPE})


def _cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


class CpuModelOps(ModelOps):
    """Needs kernels.load() to have succeeded. fused_decode: run decode-only steps as one C++ call
    (PLEXUS_FUSED_DECODE)."""

    @classmethod
    def from_config(cls, config) -> CpuModelOps:
        return cls(fused_decode=config.env.fused_decode)

    def __init__(self, fused_decode: bool = True) -> None:
        self.fused_decode = fused_decode
        self.fast_linear = kernels.fast_linear_available()
        self.fast_quant_linear = kernels.fast_quant_linear_available()
        # (model, batch: more rows than the integer GEMV serves) -> its flat weight list for llama_decode_layers,
        # or None when it cannot run fused; built at the first such decode step (after Platform.finalize_model
        # packed the weights). Whoever sets a layer's
        # delta or method later must clear it (forget_model).
        self._decode_weights_of: dict[tuple[int, bool], list | None] = {}
        self._zeros: dict[int, torch.Tensor] = {}

    def forget_model(self, model) -> None:
        for batch in (False, True):
            self._decode_weights_of.pop((id(model), batch), None)

    def linear(self, x, weight, bias=None, packed=None):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        max_rows = kernels.FAST_LINEAR_MAX_ROWS if packed is not None else kernels.FAST_LINEAR_MAX_ROWS_UNPACKED
        if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and 0 < rows <= max_rows
                and _cpu(x) and self.fast_linear):
            out = torch.ops.plexus.linear_bf16(x.reshape(rows, x.shape[-1]), weight, bias, False)
            return out.view(*x.shape[:-1], weight.shape[0])
        # (oneDNN's opaque packed tensors cannot be inputs of a compiled graph; inductor lowers F.linear itself)
        if packed is not None and rows > 0 and not torch.compiler.is_compiling():
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, bias, "none", [], "")
            return out.view(*x.shape[:-1], weight.shape[0])
        return super().linear(x, weight, bias)

    def int_linear(self, x, weight, bias=None, any_rows=False):
        """The VNNI kernel for bf16 steps of up to QUANT_LINEAR_MAX_ROWS tokens, or, where the alternative is
        dequantizing (any_rows), up to QUANT_LINEAR_MAX_ROWS_VS_DEQUANT. It rounds the activations to int8 per
        block of 32, as llama.cpp does; fp32 models keep their exact paths."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        limit = kernels.QUANT_LINEAR_MAX_ROWS_VS_DEQUANT if any_rows else kernels.QUANT_LINEAR_MAX_ROWS
        if not (self.fast_quant_linear and x.dtype == torch.bfloat16 and _cpu(x)
                and 0 < rows <= limit) or torch.compiler.is_compiling():
            return None
        x2 = x.reshape(rows, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.ops.plexus.linear_quant(x2, weight.qweight, weight.scales, weight.offsets, bias, weight.bits, False)
        return out.view(*x.shape[:-1], out.shape[-1])

    def pack_weight(self, weight):
        return kernels.pack_weight(weight)

    def pack_int8_weight(self, weight):
        return kernels.pack_int8_weight(weight)

    def w8a8_linear(self, x, packed, weight_scale, bias=None):
        """On AMX tiles (linear_w8a8_amx: quantize, int8 tile matmul and rescale in one op) where the CPU has
        them, else oneDNN's int8 matmul on its prepacked weight: the activations as uint8 q + 128 with a unit
        scale, so each token keeps its own scale, applied after with the bias."""
        if packed is None or not _cpu(x) or x.dtype not in (torch.bfloat16, torch.float32) \
                or torch.compiler.is_compiling():
            return None
        k = x.shape[-1]
        rows = x.reshape(-1, k)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if kernels.is_amx_packed(packed):
            out = torch.ops.plexus.linear_w8a8_amx(rows, packed, weight_scale, bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        q, scale = torch.ops.plexus.quantize_rows(rows)
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, weight_scale, self._zero_points(weight_scale),
                                               None, 1.0, 0, torch.float32, "none", [], "")
        out = torch.ops.plexus.scale_rows(y, scale, bias, x.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    def pack_int8_glu_weight(self, weight):
        return kernels.pack_int8_glu_weight(weight)

    def w8a8_silu_and_mul(self, x, packed, weight_scale, bias=None):
        """On AMX tiles, silu(gate) * up as the matmul's epilogue (linear_w8a8_amx_glu): the [T, 2I] gate/up
        output is never written, nor read back by a separate silu_and_mul."""
        if packed is None or not _cpu(x) or x.dtype not in (torch.bfloat16, torch.float32) \
                or torch.compiler.is_compiling():
            return None
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out = torch.ops.plexus.linear_w8a8_amx_glu(rows, packed, weight_scale, bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _zero_points(self, weight_scale):
        """oneDNN wants per-channel weight zero points beside the scales: zeros, one tensor per size."""
        n = weight_scale.shape[0]
        if n not in self._zeros:
            self._zeros[n] = torch.zeros(n, dtype=torch.int64)
        return self._zeros[n]

    def rms_norm(self, x, weight, eps):
        if _cpu(x) and x.is_contiguous() and x.dtype == weight.dtype:
            return torch.ops.plexus.rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if _cpu(x) and x.is_contiguous() and residual.is_contiguous() and x.dtype == weight.dtype:
            return torch.ops.plexus.add_rms_norm(x, residual, weight, eps), residual
        return super().add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x):
        if _cpu(x) and x.is_contiguous() and x.dim() == 2:
            return torch.ops.plexus.silu_and_mul(x)
        return super().silu_and_mul(x)

    def rope_and_cache(self, qkv, positions, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
        if _cpu(qkv) and qkv.dtype == kv_cache.dtype and kv_cache.is_contiguous():
            return torch.ops.plexus.rope_and_cache(qkv, positions, cos, sin, kv_cache, slot_mapping,
                                                   num_heads, num_kv_heads, head_dim)
        return super().rope_and_cache(qkv, positions, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads,
                                      head_dim)

    def greedy_sample(self, logits):
        if _cpu(logits) and logits.dim() == 2 and logits.stride(1) == 1 and logits.dtype in (
                torch.float32, torch.bfloat16):
            return torch.ops.plexus.greedy_sample(logits)
        return sampler.greedy_sample(logits)

    def decode_layers(self, model, hidden, positions, kv_caches, meta):
        """All layers of a step of one-token sequences in one C++ call (llama_decode_layers), for a model
        that declares the recipe the kernel implements (FUSED_DECODE_RECIPES), with unquantized or
        packed-integer weights (PackedInt), no per-token deltas and the kernel's own decode metadata (no
        mask)."""
        if not (self.fused_decode and model.decode_recipe in FUSED_DECODE_RECIPES and _cpu(hidden)
                and meta.decode is not None and meta.decode.mask is None
                and all(c.dtype == hidden.dtype and c.is_contiguous() for c in kv_caches)):
            return None
        # Integer layers take the VNNI GEMV up to QUANT_LINEAR_MAX_ROWS; longer steps run fused only where
        # every one of them is dynamic W8A8 with AMX tiles (packed when such a step first comes).
        batch = hidden.shape[0] > kernels.QUANT_LINEAR_MAX_ROWS
        key = (id(model), batch)
        if key not in self._decode_weights_of:
            self._decode_weights_of[key] = self._decode_weights(model, hidden.dtype, batch)
        weights = self._decode_weights_of[key]
        if weights is None:
            return None
        attn = model.layers[0].self_attn
        return torch.ops.plexus.llama_decode_layers(
            hidden, positions, meta.slot_mapping, meta.decode.block_tables, meta.decode.seq_lens,
            model.rotary.cos, model.rotary.sin, kv_caches, weights, model.norm.weight, model.norm.eps,
            attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.attn.scale,
            kernels.FAST_LINEAR_MAX_ROWS, kernels.FAST_LINEAR_MAX_ROWS_UNPACKED, kernels.QUANT_LINEAR_MAX_ROWS)

    def _decode_weights(self, model, dtype, batch: bool) -> list[torch.Tensor | None] | None:
        """The flat list llama_decode_layers reads: per linear its weight, bias, oneDNN-packed weight, and for
        a PackedInt its int8/uint8 values in place of the weight with its scales and offsets (and for a
        batch, the AMX tiles in place of the packed weight); or None when a layer cannot run fused (another
        quantized form, a delta such as LoRA, a packed-integer layer without the VNNI kernel or in fp32, or
        in a batch one without AMX tiles)."""
        weights: list[torch.Tensor | None] = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            entries = []
            for lin in linears:
                if lin.delta is not None:
                    return None
                if lin.method is UNQUANTIZED:
                    entries.append([lin.weight, lin.bias, lin.packed_weight, None, None])
                    continue
                packed = lin.method.packed_int(lin)
                if packed is None or not self.fast_quant_linear or dtype != torch.bfloat16:
                    return None
                tiles = None
                if batch:   # gate_up's tiles are those of the kernel with silu(gate) * up as its epilogue
                    method = lin.method
                    tiles = method.w8a8_glu_packed(lin) if lin is mlp.gate_up_proj else method.w8a8_packed(lin)
                    if not (kernels.is_amx_packed(tiles) and packed.bits == 8 and packed.scales.shape[1] == 1):
                        return None
                entries.append([packed.qweight, lin.bias_for_rank(), tiles, packed.scales, packed.offsets])
            weights.append(layer.input_layernorm.weight)
            weights += entries[0] + entries[1]
            weights.append(layer.post_attention_layernorm.weight)
            weights += entries[2] + entries[3]
        return weights


class CpuPagedAttention(TorchPagedAttention):
    """Decode groups through the C++ paged-attention kernel, which reads keys and values through the block
    tables (no gather, no mask); prefill chunks as in TorchPagedAttention."""

    decode_reads_block_tables = True

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, group: _DecodeGroup) -> torch.Tensor:
        if group.mask is not None:
            return super()._decode(q, kv_cache, group)
        out = torch.ops.plexus.paged_attention_decode(q, kv_cache, group.block_tables, group.seq_lens, self.scale)
        return out.view(q.shape[0], -1)
