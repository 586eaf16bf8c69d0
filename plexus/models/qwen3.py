"""Qwen3 (dense): the Llama decoder with q and k normalized per head (RMSNorm over head_dim) before the
rotary embedding, biases where attention_bias asks, and the sliding window on the layers its config's
layer_types name."""
from __future__ import annotations

from plexus.models.layers.decoder import DecoderLayer, GatedMLP, SelfAttention, sliding_window_of
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.norm import RMSNorm
from plexus.models.layers.recipe import QWEN3_RECIPE
from plexus.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    decode_recipe = QWEN3_RECIPE

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> DecoderLayer:
        bias = bool(getattr(cfg, "attention_bias", False))
        attn = SelfAttention(cfg, self.rotary, attn_backend, linear, f"{prefix}.self_attn", qkv_bias=bias,
                             o_bias=bias, qk_norm=RMSNorm,
                             sliding_window=sliding_window_of(cfg, self.layer_index(prefix)))
        mlp = GatedMLP(cfg, linear, f"{prefix}.mlp", bias=False)
        return DecoderLayer(cfg, attn, mlp, linear.ops)
