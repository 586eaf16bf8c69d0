"""Qwen3-MoE: Qwen3's attention (q and k normalized per head before the rotary embedding, biases where
attention_bias asks, the sliding window where use_sliding_window does) and routed experts
(plexus.models.layers.moe, moe_intermediate_size wide, num_experts_per_tok of num_experts, renormalized where
norm_topk_prob) in the layers HF makes sparse: layer i where (i + 1) % decoder_sparse_step == 0 and i is not
in mlp_only_layers; the others have a dense gated MLP of intermediate_size. The checkpoint's experts are
`mlp.experts.E.gate_proj/up_proj/down_proj.weight` (or stacked: `mlp.experts.gate_up_proj`), the router
`mlp.gate.weight`."""
from __future__ import annotations

import dataclasses

from plexus.models.layers.decoder import DecoderForCausalLM, DecoderLayer, GatedMLP, SelfAttention, \
    sliding_window_of
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.moe import FusedMoE
from plexus.models.layers.norm import RMSNorm
from plexus.models.layers.recipe import QWEN3_MOE_RECIPE


def is_sparse_layer(cfg, layer: int) -> bool:
    """HF's rule (Qwen3MoeDecoderLayer) for which layers route to experts."""
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return (cfg.num_experts > 0 and (layer + 1) % step == 0
            and layer not in (getattr(cfg, "mlp_only_layers", None) or []))


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],   # the dense layers' MLP
    }
    decode_recipe = QWEN3_MOE_RECIPE

    def __init__(self, cfg, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        if any(sliding_window_of(cfg, i) for i in range(cfg.num_hidden_layers)):
            self.decode_recipe = dataclasses.replace(self.decode_recipe, attention="sliding")

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> DecoderLayer:
        i = self.layer_index(prefix)
        bias = bool(getattr(cfg, "attention_bias", False))
        attn = SelfAttention(cfg, self.rotary, attn_backend, linear, f"{prefix}.self_attn", qkv_bias=bias,
                             o_bias=bias, qk_norm=RMSNorm, sliding_window=sliding_window_of(cfg, i))
        if is_sparse_layer(cfg, i):
            mlp = FusedMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                           renormalize=bool(cfg.norm_topk_prob), linear=linear, prefix=f"{prefix}.mlp",
                           hidden_act=cfg.hidden_act)
        else:
            mlp = GatedMLP(cfg, linear, f"{prefix}.mlp", bias=False)
        return DecoderLayer(cfg, attn, mlp, linear.ops)
