"""The model's elementwise and matmul ops in plain torch: what every platform gets.

A platform with faster versions (the CPU platform's C++ kernels) hands the model a subclass of ModelOps
through Platform.model_ops, the way it hands it an attention backend; the model never imports a device
module. Every override must compute the same thing as the method it replaces (tests hold them together)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModelOps:
    """Pure-torch ops. Subclasses override what they do faster."""

    @classmethod
    def from_config(cls, config) -> ModelOps:
        """Built by the worker from the engine's config (plexus.core.config.EngineConfig)."""
        return cls()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               packed: object = None) -> torch.Tensor:
        """x @ weight.T + bias over the last dim of x. packed: pack_weight(weight), where kept."""
        return F.linear(x, weight, bias)

    def int_linear(self, x: torch.Tensor, form, bias: torch.Tensor | None,
                   fallback: Callable[[torch.Tensor], torch.Tensor], silu_and_mul: bool = False) -> torch.Tensor:
        """x @ w.T + bias for a weight in the packed integer form (plexus.models.quantization.packed.PackedInt,
        whose w8a8 flag says the layer rounds its activations to int8 per token), on whichever of this
        platform's kernels suits x's rows and dtype, or `fallback(x)` (the layer's method, in torch; it adds the
        bias itself). silu_and_mul: return silu_and_mul of that (a gate/up layer), which a platform may fuse
        into the matmul."""
        y = fallback(x)
        return self.silu_and_mul(y) if silu_and_mul else y

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                   fallback: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x times an e4m3 weight [N, K] with per-output-channel fp32 scales, on the device's fp8 matmul (x rounded
        to e4m3 per token, or on the static input_scale) where it has one, else `fallback(x)` (the method's
        dequantizing path)."""
        return fallback(x)

    def pack_weight(self, weight: torch.Tensor) -> object:
        """A copy of an unquantized weight [N, K] in a layout linear() runs faster on, or None."""
        return None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Computed in fp32 and cast back, as HF does."""
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x); the sum is rounded to the model dtype as in HF."""
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x[:, :I]) * x[:, I:]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_and_cache(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> torch.Tensor:
        """Rotates q and k of the fused qkv rows [T, (Hq + 2 Hkv) * D] (cos/sin: [max_positions, R] fp32, R <= D:
        the first R dims of each head rotate, the rest pass through), writes k and v into their cache slots
        (cache: [2, num_blocks, block_size, Hkv, D]; slot_mapping indexes its flattened token rows) and returns
        the rotated q as [T, Hq, D]."""
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim)
        c = cos[positions].to(q.dtype)[:, None, :]
        s = sin[positions].to(q.dtype)[:, None, :]
        r = cos.shape[-1]
        if r == head_dim:
            q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        else:
            q = torch.cat((q[..., :r] * c + rotate_half(q[..., :r]) * s, q[..., r:]), dim=-1)
            k = torch.cat((k[..., :r] * c + rotate_half(k[..., :r]) * s, k[..., r:]), dim=-1)
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.reshape(k.shape))
        return q

    # A platform's one-pass greedy pick for the sampler's common case: logits [N, V] -> (argmax int64, its
    # log-probability fp32), as plexus.core.sampler.greedy_sample computes it; None: the sampler's own.
    greedy_sample = None

    def forget_model(self, model: torch.nn.Module) -> None:
        """Drop whatever this object cached about `model` (called when a layer's delta or method changes)."""

    def decode_layers(self, model: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                      kv_caches: list[torch.Tensor], meta) -> torch.Tensor | None:
        """Every decoder layer and the final norm of a decode-only step in one call, or None where this
        platform has no such fused step for the model's declared decode_recipe (plexus.models.layers.recipe:
        the model then runs layer by layer)."""
        return None

    def fused_moe(self, x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  top_k: int, renormalize: bool, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                  activation: str = "silu", alpha: float = 1.702, limit: float = 7.0,
                  routing: str = "softmax_topk") -> torch.Tensor:
        """Routed experts over x [T, H] (plexus.models.layers.moe), as HF's MoE blocks compute them: each token's
        top_k experts by select_experts (routing "softmax_topk" or "topk_softmax", weights in fp32); each
        expert's down(act(gate(x), up(x))) in the model dtype (gate and up stacked in w13 [E, 2I, H], down in
        w2 [E, H, I]; their biases, where given, b13 [E, 2I] and b2 [E, H], each added after its matmul as HF
        adds it); act "silu": silu(gate) * up, or "swigluoai": gpt-oss's clamped SwiGLU (swigluoai_and_mul, with
        alpha and limit); the outputs times their weights summed over the top_k in fp32 and rounded once.
        Grouped by expert: the token-expert pairs sorted by expert, each expert runs once over its tokens (one
        with none runs not at all). w13 and w2 may each be a StackedInt (plexus.models.layers.moe_quant): integer
        experts, each dequantized into the model dtype as it runs."""
        if activation not in ("silu", "swigluoai"):
            raise ValueError(f"fused_moe: activation must be 'silu' or 'swigluoai', got {activation!r}")
        weights, ids = select_experts(router_logits, top_k, renormalize, routing)  # [T, k]
        num_tokens, num_experts = x.shape[0], router_logits.shape[-1]

        def weight(w, e: int) -> torch.Tensor:
            return w[e] if isinstance(w, torch.Tensor) else w.dequantized_expert(e, x.dtype)

        def expert(h: torch.Tensor, e: int) -> torch.Tensor:
            gate_up = F.linear(h, weight(w13, e))  # [n, 2I]
            if b13 is not None:
                gate_up = gate_up + b13[e]
            if activation == "swigluoai":
                act = swigluoai_and_mul(gate_up, alpha, limit)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = F.silu(gate) * up
            y = F.linear(act, weight(w2, e))  # [n, H]
            return y if b2 is None else y + b2[e]

        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            # static shapes for a compiled or captured graph (no host sync): every expert over every token,
            # weighted 0 where not chosen
            dense = weights.new_zeros(num_tokens, num_experts).scatter(1, ids, weights)  # [T, E]
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for e in range(num_experts):
                out = out + expert(x, e) * dense[:, e, None]
            return out.to(x.dtype)
        pair_experts = ids.flatten()  # [T * k]: pair p is token p // k's slot p % k
        order = pair_experts.argsort(stable=True)
        counts = torch.bincount(pair_experts, minlength=num_experts).tolist()
        pair_x = x[order // top_k]  # [T * k, H], grouped by expert
        pair_out = torch.empty_like(pair_x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                pair_out[start:start + n] = expert(pair_x[start:start + n], e)
                start += n
        out = torch.empty_like(pair_out)
        out[order] = pair_out  # back to pair order
        return (out.view(num_tokens, top_k, -1) * weights[..., None]).sum(dim=1).to(x.dtype)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool, routing: str = "softmax_topk"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k experts (torch.topk, so ties pick what HF picks) and their weights in fp32, from
    router_logits [T, E], in one of HF's two orders: "softmax_topk" (Mixtral, Qwen3-MoE): the top_k of the
    softmax over every expert, renormalized to sum 1 where asked; "topk_softmax" (gpt-oss): the softmax of the
    top_k logits alone (summing to 1 already; renormalize changes nothing). The two weigh the same experts
    equally up to rounding, but only the model's own order gives HF's bits. -> (weights, ids), each [T, k]."""
    if routing == "topk_softmax":
        logits, ids = torch.topk(router_logits, top_k, dim=-1)
        return logits.float().softmax(dim=-1), ids
    if routing != "softmax_topk":
        raise ValueError(f"routing must be 'softmax_topk' or 'topk_softmax', got {routing!r}")
    weights, ids = torch.topk(router_logits.float().softmax(dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def swigluoai_and_mul(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU of [T, 2I] rows (gate, then up) -> [T, I]: gate clamped above at limit, up to
    [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate), op by op in the input's dtype as HF's experts
    compute it."""
    gate, up = x.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
