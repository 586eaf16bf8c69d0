"""Llama (1-3, SmolLM, TinyLlama) and Mistral: the shared pre-norm decoder, with biases where the config asks
for them (attention_bias on q/k/v and o, mlp_bias on the MLP) and Mistral's sliding window where its config
has one."""
from __future__ import annotations

import dataclasses

from plexus.models.layers.decoder import (DecoderForCausalLM, DecoderLayer, GatedMLP, SelfAttention,
                                          sliding_window_of)
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.recipe import LLAMA_RECIPE


class LlamaForCausalLM(DecoderForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    decode_recipe = LLAMA_RECIPE

    def __init__(self, cfg, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        if any(sliding_window_of(cfg, i) for i in range(cfg.num_hidden_layers)):
            self.decode_recipe = dataclasses.replace(self.decode_recipe, attention="sliding")

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> DecoderLayer:
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        attn = SelfAttention(cfg, self.rotary, attn_backend, linear, f"{prefix}.self_attn",
                             qkv_bias=attention_bias, o_bias=attention_bias,
                             sliding_window=sliding_window_of(cfg, self.layer_index(prefix)))
        mlp = GatedMLP(cfg, linear, f"{prefix}.mlp", bias=bool(getattr(cfg, "mlp_bias", False)))
        return DecoderLayer(cfg, attn, mlp, linear.ops)
