"""The pre-norm decoder that Llama-family architectures share: self-attention with fused q/k/v and rotary
positions, a gated MLP, RMSNorms, and the causal-LM model around a stack of them.

Tokens of all requests in a step are flattened into one [T] batch; attention reads and writes the paged KV
cache through AttentionMetadata. Every projection is a LinearLayer whose LinearMethod the quantization config
picks per layer; q/k/v and gate/up are fused layers, which the loader (plexus.models.loader) fills shard by
shard from the checkpoint's separate tensors, as the model's packed_modules_mapping says. Elementwise ops come
from the platform's ModelOps (pure torch by default). An architecture file subclasses DecoderForCausalLM and
says what differs (its biases, its recipe); what a layer computes is declared in `decode_recipe`
(plexus.models.layers.recipe) for the platforms' whole-model fast paths."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from plexus.models.layers.activation import gated_activation
from plexus.models.layers.attention import AttentionMetadata
from plexus.models.layers.embedding import VocabEmbedding, lm_head, tie_head
from plexus.models.layers.linear import LinearBuilder, LinearLayer
from plexus.models.layers.norm import RMSNorm
from plexus.models.layers.ops import ModelOps
from plexus.models.layers.recipe import DecoderRecipe
from plexus.models.layers.rotary import RotaryEmbedding
from plexus.models.loader import load_weights


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class SelfAttention(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding, attn_backend: type, linear: LinearBuilder, prefix: str,
                 qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = linear(f"{prefix}.qkv_proj", cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                               bias=qkv_bias)
        self.o_proj = linear(f"{prefix}.o_proj", self.q_size, [cfg.hidden_size], bias=o_bias)
        self.rotary = rotary
        self.ops = linear.ops
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        self.rotary.to_device(positions.device)
        q = self.ops.rope_and_cache(qkv, positions, self.rotary.cos, self.rotary.sin, kv_cache, meta.slot_mapping,
                                    self.num_heads, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, kv_cache, meta))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up as one fused layer."""

    def __init__(self, cfg, linear: LinearBuilder, prefix: str, bias: bool) -> None:
        super().__init__()
        gated_activation(cfg)   # SiLU, the only one so far: LinearLayer.silu_and_mul
        inter = cfg.intermediate_size
        self.gate_up_proj = linear(f"{prefix}.gate_up_proj", cfg.hidden_size, [inter, inter], bias)
        self.down_proj = linear(f"{prefix}.down_proj", inter, [cfg.hidden_size], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, self_attn: nn.Module, mlp: nn.Module, ops: ModelOps) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions, hidden, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried separately so each add fuses into the next norm."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderForCausalLM(nn.Module):
    """A causal LM of DecoderLayers. Subclasses set what differs: `make_layer`, `packed_modules_mapping`
    (vLLM's: fused layer -> the checkpoint's names of its shards, in order) and `decode_recipe`."""

    packed_modules_mapping: dict[str, list[str]]
    # What each layer computes, for the platforms' whole-model fast paths; None (undeclared): none applies.
    decode_recipe: DecoderRecipe | None = None

    def __init__(self, cfg, attn_backend: type, max_positions: int, ops: ModelOps | None = None,
                 quant_config=None) -> None:
        """quant_config: a plexus.models.quantization config, which picks each projection's LinearMethod."""
        super().__init__()
        self.config = cfg
        self.ops = ops or ModelOps()
        self.quant_config = quant_config
        linear = LinearBuilder(self.ops, quant_config, self.packed_modules_mapping)
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_positions)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(cfg, attn_backend, linear, f"layers.{i}")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = lm_head(linear, cfg.hidden_size, cfg.vocab_size, self.tie_word_embeddings)

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, fused: bool = True) -> torch.Tensor:
        """Final hidden states [T, hidden]. fused=False keeps the layer-by-layer ops (what compiled and
        captured decode graphs trace); otherwise a decode-only step may run as the platform's one fused call
        (ModelOps.decode_layers), where the platform implements this model's decode_recipe."""
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        if fused and meta.decode is not None and not meta.prefills:
            out = self.ops.decode_layers(self, hidden, positions, kv_caches, meta)
            if out is not None:
                return out
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # In the model dtype, as HF computes them; the sampler reads them in fp32.
        return self.lm_head(hidden)  # [N, vocab]

    def lora_modules(self) -> dict[str, tuple[nn.Module, int | str]]:
        """What a LoRA adapter may target, by the checkpoint's module names: name -> (LinearLayer, shard) or
        (the embedding, "embedding")."""
        out: dict[str, tuple[nn.Module, int | str]] = {"embed_tokens": (self.embed_tokens, "embedding")}
        for prefix, module in self.named_modules():
            if not isinstance(module, LinearLayer):
                continue
            parent, _, name = prefix.rpartition(".")
            for shard, shard_name in enumerate(self.packed_modules_mapping.get(name, (name,))):
                out[f"{parent}.{shard_name}" if parent else shard_name] = (module, shard)
        return out

    def linear_layers(self) -> list[LinearLayer]:
        return [m for m in self.modules() if isinstance(m, LinearLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip_prefixes = []
        if self.tie_word_embeddings:
            tie_head(self.lm_head, self.embed_tokens)
            skip_prefixes.append("lm_head.")  # tied: the embedding serves as the head
        load_weights(self, weights, strip_prefix="model.", skip_prefixes=skip_prefixes,
                     skip_substrs=["rotary_emb."])
