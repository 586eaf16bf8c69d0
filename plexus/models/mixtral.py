"""Mixtral: Llama's attention (with Mistral's sliding window where the config has one) and routed experts in
every layer's MLP (plexus.models.layers.moe): each token's num_experts_per_tok of num_local_experts experts,
their weights always renormalized to sum 1.

The checkpoint calls the MoE block `block_sparse_moe` (`model.layers.N.block_sparse_moe.gate.weight`, the
experts' `experts.E.w1/w3/w2.weight` for gate, up and down); transformers' own layout calls it `mlp`, with the
experts stacked (`mlp.experts.gate_up_proj`). plexus names it `mlp` and reads both."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from plexus.models.layers.decoder import DecoderForCausalLM, DecoderLayer, SelfAttention, sliding_window_of
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.moe import FusedMoE
from plexus.models.layers.recipe import MIXTRAL_RECIPE

# The checkpoint's names of each expert's gate, up and down projections.
EXPERT_NAMES = ("w1", "w3", "w2")


class MixtralForCausalLM(DecoderForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    }
    decode_recipe = MIXTRAL_RECIPE

    def __init__(self, cfg, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        if any(sliding_window_of(cfg, i) for i in range(cfg.num_hidden_layers)):
            self.decode_recipe = dataclasses.replace(self.decode_recipe, attention="sliding")

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> DecoderLayer:
        attn = SelfAttention(cfg, self.rotary, attn_backend, linear, f"{prefix}.self_attn", qkv_bias=False,
                             o_bias=False, sliding_window=sliding_window_of(cfg, self.layer_index(prefix)))
        moe = FusedMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                       renormalize=True, linear=linear, prefix=f"{prefix}.mlp", hidden_act=cfg.hidden_act,
                       expert_names=EXPERT_NAMES, checkpoint_prefix=f"{prefix}.block_sparse_moe")
        return DecoderLayer(cfg, attn, moe, linear.ops)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights)

    def lora_modules(self) -> dict[str, tuple[nn.Module, int | str]]:
        """The router under its checkpoint name, block_sparse_moe.gate, as an adapter names it."""
        return {name.removesuffix(".mlp.gate") + ".block_sparse_moe.gate" if name.endswith(".mlp.gate") else name:
                target for name, target in super().lora_modules().items()}
