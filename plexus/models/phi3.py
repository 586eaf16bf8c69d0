"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (Phi3ForCausalLM): Llama's decoder, stored by its checkpoints already
fused (self_attn.qkv_proj [q + 2 kv, hidden]; mlp.gate_up_proj [2 I, hidden], gate first), with what these
configs add: a partial rotary embedding (Phi-4-mini turns the first 3/4 of each head), LongRoPE scaling
(Phi-3-*-128k, Phi-3.5, Phi-4-mini: as in vLLM, the long factor for the whole context when max_model_len
passes original_max_position_embeddings, else the short one: plexus.models.layers.rotary) and the sliding window on every layer where the
config has one (Phi-3-mini-4k: 2047; a window per layer, never a cap on the context). A window that covers the
whole context (Phi-3.5-mini's 262144 over 131072 positions) excludes no key: those layers attend in full, as
the whole-model fast paths run them."""
from __future__ import annotations

import dataclasses

from torch import nn

from plexus.models.layers.decoder import (DecoderForCausalLM, DecoderLayer, GatedMLP, SelfAttention, head_dim_of,
                                          sliding_window_of)
from plexus.models.layers.linear import LinearBuilder, LinearLayer
from plexus.models.layers.recipe import LLAMA_RECIPE, PHI3_PARTIAL_ROPE_RECIPE


class Phi3ForCausalLM(DecoderForCausalLM):
    # The checkpoint's tensors are the fused layers' own (qkv_proj, gate_up_proj): no shards to map. A fused
    # layer's whole tensor fills all its shards (LinearLayer.load_weight), and a quantization config's ignore
    # list names the fused module, as the checkpoint does.
    packed_modules_mapping: dict[str, list[str]] = {}
    decode_recipe = LLAMA_RECIPE

    def __init__(self, cfg, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        recipe = self.decode_recipe
        if self.rotary.rotary_dim < head_dim_of(cfg):
            recipe = PHI3_PARTIAL_ROPE_RECIPE
        if any(self.window_of(i) for i in range(cfg.num_hidden_layers)):
            recipe = dataclasses.replace(recipe, attention="sliding")
        self.decode_recipe = recipe

    def window_of(self, layer: int) -> int | None:
        """The layer's sliding window, or None where it is at least the context: a query at p sees the keys after
        p - window, which is then every earlier one."""
        window = sliding_window_of(self.config, layer)
        return window if window and window < self.max_positions else None

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> DecoderLayer:
        attn = SelfAttention(cfg, self.rotary, attn_backend, linear, f"{prefix}.self_attn", qkv_bias=False,
                             o_bias=False, sliding_window=self.window_of(self.layer_index(prefix)))
        return DecoderLayer(cfg, attn, GatedMLP(cfg, linear, f"{prefix}.mlp", bias=False), linear.ops)

    def lora_modules(self) -> dict[str, tuple[nn.Module, int | str]]:
        """PEFT adapters of Phi-3 target qkv_proj and gate_up_proj whole (one lora_A [r, hidden] and one lora_B
        [q + 2 kv, r]), so LoRA sees each fused layer as a layer of one output."""
        modules = super().lora_modules()
        for name, (module, _) in modules.items():
            if isinstance(module, LinearLayer) and len(module.output_sizes) > 1:
                modules[name] = (WholeFusedLayer(module), 0)
        return modules


class WholeFusedLayer:
    """A fused LinearLayer as plexus.models.lora.LoRAModel reads a target: its input size, one output of all its
    shards' rows, its ops; the LoRA delta set here is set on the layer itself."""

    def __init__(self, layer: LinearLayer) -> None:
        self.layer, self.ops = layer, layer.ops
        self.input_size, self.output_sizes = layer.input_size, [sum(layer.output_sizes)]

    @property
    def delta(self):
        return self.layer.delta

    @delta.setter
    def delta(self, delta) -> None:
        self.layer.delta = delta
