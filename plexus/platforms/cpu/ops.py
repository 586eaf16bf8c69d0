"""The CPU platform's ops: plexus's C++ kernels (kernels/ops.cpp) behind the ModelOps interface, and the
paged attention backend whose decode reads keys through the block tables.

Each method takes the kernel where the tensors suit it (CPU, dtype, contiguity) and the pure-torch
ModelOps method otherwise, so results never depend on which served; tests/test_kernels.py holds each
kernel against the torch code it replaces."""
from __future__ import annotations

import dataclasses

import torch

from plexus.core import sampler
from plexus.models.layers.attention import TorchPagedAttention, _DecodeGroup
from plexus.models.layers.linear import UNQUANTIZED
from plexus.models.layers.moe import FusedMoE
from plexus.models.layers.moe_quant import StackedInt
from plexus.models.layers.ops import ModelOps
from plexus.models.layers.recipe import (LLAMA_RECIPE, MIXTRAL_RECIPE, PHI3_PARTIAL_ROPE_RECIPE, QWEN3_MOE_RECIPE,
                                         QWEN3_RECIPE)
from plexus.models.quantization import packed as packed_int
from plexus.platforms.cpu import kernels
from plexus.platforms.cpu.kernels import Kernel

# What llama_decode_layers computes (kernels/ops.cpp): RMSNorm pre-norms, fused q/k/v (with or without per-head
# q/k RMSNorms) with rotate-half rotary over all of each head or its first part (the table's width), causal GQA
# over every position or each layer's window, a dense SiLU-gated MLP or routed SiLU experts (moe.cpp's ops,
# softmax-then-top-k routing, no expert biases). Any other model runs layer by layer, through the same kernels
# per op.
FUSED_DECODE_RECIPES = frozenset(dataclasses.replace(recipe, attention=attention)
                                 for recipe in (LLAMA_RECIPE, QWEN3_RECIPE, PHI3_PARTIAL_ROPE_RECIPE, MIXTRAL_RECIPE,
                                                QWEN3_MOE_RECIPE)
                                 for attention in ("causal", "sliding"))


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
        # (model, kernels.row_class of the step) -> (flat weight list, kernel per linear) for llama_decode_layers,
        # or None when it cannot run fused; built at the first such decode step (after Platform.finalize_model
        # placed the weights). Whoever sets a layer's delta or method later must clear it (forget_model).
        self._decode_weights_of: dict[tuple[int, int], tuple | None] = {}
        self._zeros: dict[int, torch.Tensor] = {}

    def forget_model(self, model) -> None:
        for key in [key for key in self._decode_weights_of if key[0] == id(model)]:
            del self._decode_weights_of[key]

    def linear(self, x, weight, bias=None, packed=None):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        dtype = x.dtype if _cpu(x) and weight.dtype == x.dtype else None
        kernel = kernels.choose_linear(rows, dtype, packed=packed is not None)
        if kernel == Kernel.BF16_GEMV:
            out = torch.ops.plexus.linear_bf16(x.reshape(rows, x.shape[-1]), weight, bias, False)
        elif kernel == Kernel.ONEDNN:
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, bias, "none", [], "")
        else:
            return super().linear(x, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    def int_linear(self, x, form, bias, fallback, silu_and_mul=False):
        """The kernel kernels.choose_linear picks for the step: the VNNI GEMV for bf16 steps of few tokens
        (more where the method's own path dequantizes), for dynamic W8A8 layers on longer steps AMX tiles (with
        silu(gate) * up as the epilogue where asked) or oneDNN's int8 matmul; else the method's path."""
        k = x.shape[-1]
        rows = x.numel() // k if k else 0
        kernel = kernels.choose_linear(rows, x.dtype if _cpu(x) else None, form=form, glu=silu_and_mul)
        if kernel == Kernel.METHOD:
            return super().int_linear(x, form, bias, fallback, silu_and_mul)
        x2 = x.reshape(rows, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if kernel == Kernel.INT_GEMV:
            out = torch.ops.plexus.linear_quant(x2, form.qweight, form.group_scales, form.group_offsets, bias,
                                                form.bits, False)
        elif kernel == Kernel.W8A8_AMX_GLU:
            out = torch.ops.plexus.linear_w8a8_amx_glu(x2, kernels.layout(form, kernel), form.scales, bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        elif kernel == Kernel.W8A8_AMX:
            out = torch.ops.plexus.linear_w8a8_amx(x2, kernels.layout(form, kernel), form.scales, bias)
        else:
            out = self.w8a8_onednn(x2, kernels.layout(form, kernel), form.scales, bias)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return self.silu_and_mul(out) if silu_and_mul else out

    def pack_weight(self, weight):
        return kernels.pack_weight(weight)

    def w8a8_onednn(self, x: torch.Tensor, packed, weight_scale: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
        """x [M, K] rounded to int8 per token times an int8 weight prepacked for oneDNN (kernels.pack_int8_onednn)
        with its per-channel weight_scale, + bias: the activations go in as uint8 q + 128 with a unit scale, so
        each token keeps its own scale, applied after with the bias."""
        q, scale = torch.ops.plexus.quantize_rows(x)
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, weight_scale, self._zero_points(weight_scale),
                                               None, 1.0, 0, torch.float32, "none", [], "")
        return torch.ops.plexus.scale_rows(y, scale, bias, x.dtype)

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
        that declares the recipe the kernel implements (FUSED_DECODE_RECIPES), where the kernel
        kernels.choose_linear picks for every linear at this row count is one the fused step runs, no linear
        has a per-token delta, and the step has the kernel's own decode metadata (no mask)."""
        if not (self.fused_decode and model.decode_recipe in FUSED_DECODE_RECIPES and _cpu(hidden)
                and meta.decode is not None and meta.decode.mask is None
                and all(c.dtype == hidden.dtype and c.is_contiguous() for c in kv_caches)):
            return None
        rows = hidden.shape[0]
        key = (id(model), kernels.row_class(rows))
        if key not in self._decode_weights_of:
            self._decode_weights_of[key] = self._decode_weights(model, hidden.dtype, rows)
        plan = self._decode_weights_of[key]
        if plan is None:
            return None
        weights, kernel_ids, moe, moe_args = plan
        attn = model.layers[0].self_attn
        windows = [layer.self_attn.attn.sliding_window or 0 for layer in model.layers]
        return torch.ops.plexus.llama_decode_layers(
            hidden, positions, meta.slot_mapping, meta.decode.block_tables, meta.decode.seq_lens,
            model.rotary.cos, model.rotary.sin, kv_caches, weights, kernel_ids, windows, model.norm.weight,
            model.norm.eps, attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.attn.scale, moe, moe_args)

    def _decode_weights(self, model, dtype, rows: int) -> tuple[list, list[int], list, list[int]] | None:
        """The flat weight list llama_decode_layers reads (per linear: weight, bias, packed weight, scales,
        offsets, each what its kernel reads or None) and the kernel of each linear, as choose_linear picks them
        for `rows`, and for MoE models each layer's router and experts (_moe_entries; empty lists for dense
        models); or None when a layer cannot run fused (a method with no int_form, a delta such as LoRA, a
        kernel the fused step does not have, experts fused_moe would not take)."""
        weights: list[torch.Tensor | None] = []
        kernel_ids: list[int] = []
        moe: list[torch.Tensor | None] = []
        moe_args: list[int] = []
        has_moe = model.decode_recipe.mlp == "moe"
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            entries = []
            routed = isinstance(mlp, FusedMoE)
            if has_moe:
                found = self._moe_entries(mlp, dtype) if routed else ([None] * 8, [0, 0, 0, 0])
                if found is None:
                    return None
                moe += found[0]
                moe_args += found[1]
            for i, lin in enumerate((attn.qkv_proj, attn.o_proj) + (() if routed else (mlp.gate_up_proj,
                                                                                        mlp.down_proj))):
                form = lin.int_form
                if lin.delta is not None or (form is None and lin.method is not UNQUANTIZED):
                    return None
                if form is None:
                    kernel = kernels.choose_linear(rows, dtype if lin.weight.dtype == dtype else None,
                                                   packed=lin.packed_weight is not None)
                    entries.append([lin.weight, lin.bias_for_rank(), lin.packed_weight, None, None])
                else:
                    kernel = kernels.choose_linear(rows, dtype, form=form, glu=i == 2)
                    if kernel not in kernels.FUSED_KERNELS:
                        return None
                    tiles = kernels.layout(form, kernel) if kernel != Kernel.INT_GEMV else None
                    entries.append([form.qweight, lin.bias_for_rank(), tiles, form.group_scales, form.group_offsets])
                kernel_ids.append(int(kernel))
            if routed:
                entries += [[None] * 5, [None] * 5]
                kernel_ids += [int(Kernel.ATEN)] * 2
            weights.append(layer.input_layernorm.weight)
            weights += entries[0] + entries[1]
            weights.append(layer.post_attention_layernorm.weight)
            weights += entries[2] + entries[3]
            weights += [attn.q_norm.weight, attn.k_norm.weight] if model.decode_recipe.qk_norm else [None, None]
        return weights, kernel_ids, moe, moe_args

    def _moe_entries(self, mlp, dtype) -> tuple[list, list[int]] | None:
        """A routed-experts layer's 8 tensors and 4 numbers for llama_decode_layers (the router's weight and bias;
        w13 or its integers, scales, offsets; w2 likewise; top_k, renormalize and each weight's bits, 0 for
        dense), or None where this step's fused_moe would not take its kernels (the router with a delta or
        another dtype, biases, another activation or routing, integer experts in an fp32 step)."""
        router = mlp.gate
        if (router.delta is not None or router.weight.dtype != dtype or mlp.b13 is not None
                or mlp.activation != "silu" or mlp.routing != "softmax_topk"):
            return None
        tensors, bits = [router.weight, router.bias_for_rank()], []
        for w in mlp._experts():
            if isinstance(w, torch.Tensor):
                if w.dtype != dtype:
                    return None
                tensors += [w, None, None]
                bits.append(0)
            elif (dtype == torch.bfloat16 and kernels.fast_quant_linear_available()
                  and packed_int.supports(w.in_features, w.group_size, w.bits)):
                tensors += [w.qweight, w.scales, w.offsets]
                bits.append(w.bits)
            else:
                return None
        if (bits[0] == 0) != (bits[1] == 0):
            return None
        return tensors, [mlp.top_k, int(mlp.renormalize), *bits]

    def fused_moe(self, x, router_logits, w13, w2, top_k, renormalize, b13=None, b2=None, activation="silu",
                  alpha=1.702, limit=7.0, routing="softmax_topk"):
        """kernels/moe.cpp (each expert once over its tokens, threads over experts) for fp32 and bf16 weights (and
        biases) in the activations' dtype, and for integer experts (StackedInt) in bf16 steps, on the VNNI GEMV
        (fp32 models keep the exact path, as choose_linear keeps theirs)."""
        args = (b13, b2, activation, alpha, limit, routing)
        if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor):
            if (_cpu(x) and x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous()
                    and kernels.fast_quant_linear_available()
                    and all(isinstance(w, StackedInt) and packed_int.supports(w.in_features, w.group_size, w.bits)
                            for w in (w13, w2))
                    and all(t.dtype == x.dtype and t.is_contiguous() for t in (b13, b2) if t is not None)):
                return torch.ops.plexus.fused_moe_int(x, router_logits, w13.qweight, w13.scales, w13.offsets,
                                                      w13.bits, w2.qweight, w2.scales, w2.offsets, w2.bits, top_k,
                                                      renormalize, *args)
            return super().fused_moe(x, router_logits, w13, w2, top_k, renormalize, *args)
        if (_cpu(x) and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
                and all(t.dtype == x.dtype and t.is_contiguous() for t in (w13, w2, b13, b2) if t is not None)):
            return torch.ops.plexus.fused_moe(x, router_logits, w13, w2, top_k, renormalize, *args)
        return super().fused_moe(x, router_logits, w13, w2, top_k, renormalize, *args)


class CpuPagedAttention(TorchPagedAttention):
    """Decode groups through the C++ paged-attention kernel, which reads keys and values through the block
    tables (no gather, no mask); prefill chunks as in TorchPagedAttention."""

    decode_reads_block_tables = True

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, group: _DecodeGroup, sinks=None) -> torch.Tensor:
        if group.mask is not None or self.logits_soft_cap is not None or self.has_sinks:
            return super()._decode(q, kv_cache, group, sinks)
        out = torch.ops.plexus.paged_attention_decode(q, kv_cache, group.block_tables, group.seq_lens, self.scale,
                                                      self.sliding_window or 0)
        return out.view(q.shape[0], -1)
