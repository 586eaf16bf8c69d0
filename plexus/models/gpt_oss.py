"""gpt-oss (GptOssForCausalLM): Llama's pre-norm decoder with biases on q/k/v/o, head_dim from the config,
grouped-query attention with a learned sink logit per head (`self_attn.sinks`), sliding-window layers
alternating with full ones (config.layer_types), YaRN rotary, untied embeddings, and routed experts in every
layer's MLP (plexus.models.layers.moe) as transformers computes them:

- the router (`mlp.router`, hidden -> E with a bias) ranks the logits, and the softmax of the top k alone
  weighs the chosen experts (HF's order, which plexus follows bit for bit: softmax over all, top k and
  renormalize is the same up to rounding only);
- each expert's gate/up and down have biases, and its activation is the clamped SwiGLU: gate clamped above at
  swiglu_limit, up to [-swiglu_limit, swiglu_limit], (up + 1) * gate * sigmoid(swiglu_alpha * gate). The
  config's hidden_act ("silu") does not describe it.

The checkpoint stacks the experts as transformers keeps them, `mlp.experts.gate_up_proj` [E, H, 2I] with gate
and up interleaved along the last dimension, `down_proj` [E, I, H], and their biases; or, on the hub
(openai/gpt-oss-*), the two weights in MXFP4 (`*_blocks`, `*_scales`, quant_method "mxfp4"), kept as the
same values in int8 with a scale per block of 32 (plexus.models.quantization.mxfp4). plexus calls the router `mlp.gate`, as for every MoE block."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from plexus.models.layers.decoder import DecoderForCausalLM, DecoderLayer, SelfAttention, sliding_window_of
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.moe import FusedMoE
from plexus.models.layers.recipe import GPT_OSS_RECIPE


class GptOssForCausalLM(DecoderForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    }
    decode_recipe = GPT_OSS_RECIPE

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> DecoderLayer:
        i = self.layer_index(prefix)
        bias = bool(getattr(cfg, "attention_bias", True))
        attn = SelfAttention(cfg, self.rotary_for(i), attn_backend, linear, f"{prefix}.self_attn", qkv_bias=bias,
                             o_bias=bias, sliding_window=sliding_window_of(cfg, i), sinks=True)
        moe = FusedMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                       renormalize=True, linear=linear, prefix=f"{prefix}.mlp", hidden_act="swigluoai",
                       router_bias=True, expert_bias=True, routing="topk_softmax",
                       swiglu_alpha=getattr(cfg, "swiglu_alpha", 1.702), swiglu_limit=cfg.swiglu_limit,
                       gate_up_interleaved=True, stacked_transposed=True)
        return DecoderLayer(cfg, attn, moe, linear.ops)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(".mlp.router.", ".mlp.gate."), tensor) for name, tensor in weights)

    def lora_modules(self) -> dict[str, tuple[nn.Module, int | str]]:
        """The router under its checkpoint name, mlp.router, as an adapter names it."""
        return {name.removesuffix(".mlp.gate") + ".mlp.router" if name.endswith(".mlp.gate") else name:
                target for name, target in super().lora_modules().items()}
