"""Qwen2 (and Qwen2.5): the Llama decoder with a bias on q, k and v (not on o, nor the MLP), and the sliding
window on the layers its config's layer_types name (use_sliding_window)."""
from __future__ import annotations

from plexus.models.layers.decoder import DecoderLayer, GatedMLP, SelfAttention, sliding_window_of
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.recipe import LLAMA_RECIPE
from plexus.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    decode_recipe = LLAMA_RECIPE    # the q/k/v biases are the layers' own: every path adds them

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> DecoderLayer:
        attn = SelfAttention(cfg, self.rotary, attn_backend, linear, f"{prefix}.self_attn", qkv_bias=True,
                             o_bias=False, sliding_window=sliding_window_of(cfg, self.layer_index(prefix)))
        mlp = GatedMLP(cfg, linear, f"{prefix}.mlp", bias=False)
        return DecoderLayer(cfg, attn, mlp, linear.ops)
