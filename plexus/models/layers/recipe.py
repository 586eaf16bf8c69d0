"""What a decoder layer computes, declared by the model for the whole-model fast paths.

A platform's fast path that replaces the model's own layer-by-layer forward (the CPU platform's fused C++
decode step; compiled and captured decode graphs) implements some recipes and runs a model only if the
model's `decode_recipe` is one of them. A model that computes anything else (one more norm, another
activation, a window) declares another recipe, or none, and runs layer by layer with the same kernels per op:
a fast path never looks at a model's modules to guess what it computes.

Biases are no part of a recipe: they belong to their LinearLayer, and every path adds each layer's own."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderRecipe:
    # "rms": RMSNorm before attention and before the MLP, the residual added into the next norm, and one after
    # the last layer, all with the same eps
    norm: str = "rms"
    # "rope": rotate-half rotary embedding of q and k from one cos/sin table shared by every layer
    position: str = "rope"
    # RMSNorm of q and k per head before the rotary embedding (Qwen3, Gemma 3)
    qk_norm: bool = False
    # "causal": grouped-query attention over every earlier position, scale head_dim ** -0.5 (no sliding
    # window, sinks or soft-capping); "sliding": the same within each layer's own window
    attention: str = "causal"
    # "dense": one gated MLP, down(act(gate) * up), per layer ("moe": routed experts)
    mlp: str = "dense"
    activation: str = "silu"
    # The layout the fused paths read: layers[i].input_layernorm, .self_attn (qkv_proj, o_proj),
    # .post_attention_layernorm, .mlp (gate_up_proj, down_proj); model.rotary, model.norm
    # (plexus.models.layers.decoder)
    layout: str = "decoder-layer"


# Llama, Mistral, Qwen2, SmolLM: what the shared DecoderLayer computes.
LLAMA_RECIPE = DecoderRecipe()

# Qwen3: Llama's layer with q and k normalized per head before the rotary embedding.
QWEN3_RECIPE = DecoderRecipe(qk_norm=True)

# Mixtral: Llama's layer with routed experts (plexus.models.layers.moe) in place of the dense MLP.
MIXTRAL_RECIPE = DecoderRecipe(mlp="moe")

# Qwen3-MoE: Qwen3's layer with routed experts in the layers its config makes sparse, a dense gated MLP in the
# others (decoder_sparse_step, mlp_only_layers).
QWEN3_MOE_RECIPE = DecoderRecipe(qk_norm=True, mlp="moe")

# Phi-4-mini (Phi-3 configs with partial_rotary_factor < 1): Llama's layer whose rotary embedding turns only
# the first rotary_dim dimensions of each q and k head (the cos/sin table's width); the rest pass through.
PHI3_PARTIAL_ROPE_RECIPE = DecoderRecipe(position="partial-rope")

# Gemma 2: (1 + w) RMSNorms before and after attention and the MLP, scaled embeddings, GeGLU, scores scaled by
# query_pre_attn_scalar and soft-capped, interleaved sliding-window layers. Gemma 3: the same with q/k norms and
# a RoPE base per layer type, no soft-capping. (No fused step runs them yet: they run layer by layer.)
GEMMA2_RECIPE = DecoderRecipe(norm="gemma", attention="gemma2", activation="gelu_tanh", layout="gemma-layer")
GEMMA3_RECIPE = DecoderRecipe(norm="gemma", qk_norm=True, attention="gemma3", activation="gelu_tanh",
                              layout="gemma-layer")

# gpt-oss: Llama's norms and YaRN rotary (one table), attention with a learned sink logit per head on every layer
# and sliding windows on alternate ones, routed experts with biases and the clamped SwiGLU ("swigluoai"), their
# router ranking the logits before its softmax. (No fused step runs it yet: it runs layer by layer.)
GPT_OSS_RECIPE = DecoderRecipe(attention="sinks", mlp="moe", activation="swigluoai")
