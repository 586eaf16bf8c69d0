"""Gemma 2 and Gemma 3 (text), and the text model of Gemma 3's multimodal checkpoints.

What differs from Llama's decoder: RMSNorms whose weight is an offset from one (GemmaRMSNorm), four of them
per layer (after attention and after the MLP as well as before each, the residual added after the post-norms),
embeddings scaled by sqrt(hidden_size) in the model dtype, a GeGLU MLP (hidden_activation, gelu with the tanh
approximation), attention scaled by query_pre_attn_scalar ** -0.5, and sliding-window layers interleaved with
full ones as config.layer_types says, each with its own window. Gemma 2 soft-caps attention scores
(attn_logit_softcapping) and the final logits (final_logit_softcapping); Gemma 3 normalizes q and k per head
and gives its local and global layers their own RoPE (rope_parameters keyed by layer type).

A Gemma3ForConditionalGeneration checkpoint runs as its text model: the engine reads its text_config
(plexus.model_files.hf_config.text_model_config), and the loader takes the language model's tensors under
either naming (the original export's language_model.model.*, which save_pretrained still writes, or the
model.language_model.* of transformers 5's modules) and leaves the vision tower and projector out."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from plexus.models.layers.decoder import DecoderForCausalLM, GatedMLP, SelfAttention, sliding_window_of
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.norm import GemmaRMSNorm
from plexus.models.layers.recipe import GEMMA2_RECIPE, GEMMA3_RECIPE

# Multimodal checkpoints' names of the language model's tensors -> the text model's ("model." is then
# stripped as for any causal LM); the vision tower's and projector's tensors are not the text model's.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


class GemmaDecoderLayer(nn.Module):
    """Pre- and post-norms around attention and around the MLP. The residual stream is carried separately,
    as in DecoderLayer: the post-norms' outputs are added into it by the next pre-norm."""

    def __init__(self, cfg, self_attn: nn.Module, mlp: nn.Module, ops) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)   # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(self, positions, hidden, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(DecoderForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    decode_recipe = GEMMA2_RECIPE
    norm_class = GemmaRMSNorm
    qk_norm: type[nn.Module] | None = None       # Gemma 3: GemmaRMSNorm of each q and k head

    def __init__(self, cfg, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        self.embed_scale = cfg.hidden_size ** 0.5
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> GemmaDecoderLayer:
        i = self.layer_index(prefix)
        bias = bool(getattr(cfg, "attention_bias", False))
        attn = SelfAttention(cfg, self.rotary_for(i), attn_backend, linear, f"{prefix}.self_attn", qkv_bias=bias,
                             o_bias=bias, qk_norm=self.qk_norm, scale=cfg.query_pre_attn_scalar ** -0.5,
                             sliding_window=sliding_window_of(cfg, i),
                             logits_soft_cap=getattr(cfg, "attn_logit_softcapping", None))
        mlp = GatedMLP(cfg, linear, f"{prefix}.mlp", bias=False, act_key="hidden_activation")
        return GemmaDecoderLayer(cfg, attn, mlp, linear.ops)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_text_model_weights(weights))


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    decode_recipe = GEMMA3_RECIPE
    qk_norm = GemmaRMSNorm


def _text_model_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if name.startswith(_VISION_PREFIXES):
            continue
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        yield name, tensor
