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

from plexus.models.layers.activation import act_and_mul, gated_activation
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


def layer_type_of(cfg, layer: int) -> str:
    """"sliding_attention" or "full_attention": the config's layer_types where it has them (Gemma, gpt-oss,
    Qwen2/3 with use_sliding_window), else one kind for every layer (Mistral's window applies to all)."""
    types = getattr(cfg, "layer_types", None)
    if types:
        return types[layer]
    window = getattr(cfg, "sliding_window", None)
    return "sliding_attention" if window and getattr(cfg, "use_sliding_window", True) else "full_attention"


def sliding_window_of(cfg, layer: int) -> int | None:
    """The layer's window (HF's rule: a query at p sees keys after p - window), None for a full layer."""
    window = getattr(cfg, "sliding_window", None)
    return window if window and layer_type_of(cfg, layer) == "sliding_attention" else None


class SelfAttention(nn.Module):
    """q/k/v as one fused layer, rotary positions, paged attention, the output projection.

    What families add: qk_norm (RMSNorm of each q and k head before the rotary embedding, norm_class's kind:
    Qwen3, Gemma 3), scale (Gemma's query_pre_attn_scalar ** -0.5; head_dim ** -0.5 otherwise), the layer's
    sliding window, attention logit soft-capping (Gemma 2) and sinks (gpt-oss: a learned logit per head,
    `self_attn.sinks` in the checkpoint)."""

    def __init__(self, cfg, rotary: RotaryEmbedding, attn_backend: type, linear: LinearBuilder, prefix: str,
                 qkv_bias: bool, o_bias: bool, *, qk_norm: type[nn.Module] | None = None,
                 scale: float | None = None, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None, sinks: bool = False) -> None:
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
        if qk_norm is not None:
            self.q_norm = qk_norm(self.head_dim, cfg.rms_norm_eps, self.ops)
            self.k_norm = qk_norm(self.head_dim, cfg.rms_norm_eps, self.ops)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if sinks else None
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, self.head_dim,
                                 self.head_dim ** -0.5 if scale is None else scale, sliding_window=sliding_window,
                                 logits_soft_cap=logits_soft_cap, has_sinks=sinks)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        if hasattr(self, "q_norm"):
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.kv_size)
            qkv = torch.cat((q, k, v), dim=-1)
        self.rotary.to_device(positions.device)
        q = self.ops.rope_and_cache(qkv, positions, self.rotary.cos, self.rotary.sin, kv_cache, meta.slot_mapping,
                                    self.num_heads, self.num_kv_heads, self.head_dim)
        if self.sinks is not None:
            return self.o_proj(self.attn(q, kv_cache, meta, sinks=self.sinks))
        return self.o_proj(self.attn(q, kv_cache, meta))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up as one fused layer; act is the config's hidden_act (act_key: the
    config field that names it, Gemma's hidden_activation)."""

    def __init__(self, cfg, linear: LinearBuilder, prefix: str, bias: bool, act_key: str = "hidden_act") -> None:
        super().__init__()
        self.act = gated_activation(cfg, act_key)
        inter = cfg.intermediate_size
        self.gate_up_proj = linear(f"{prefix}.gate_up_proj", cfg.hidden_size, [inter, inter], bias)
        self.down_proj = linear(f"{prefix}.down_proj", inter, [cfg.hidden_size], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "silu":
            return self.down_proj(self.gate_up_proj.silu_and_mul(x))
        return self.down_proj(act_and_mul(self.act, self.gate_up_proj(x)))


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
    (vLLM's: fused layer -> the checkpoint's names of its shards, in order) and `decode_recipe`; and where
    they need them, `norm_class` (the final norm's kind), `embed_scale` (a factor on the embeddings, in the
    model dtype: Gemma's sqrt(hidden)) and `final_logit_softcapping` (Gemma 2)."""

    packed_modules_mapping: dict[str, list[str]]
    # What each layer computes, for the platforms' whole-model fast paths; None (undeclared): none applies.
    decode_recipe: DecoderRecipe | None = None
    norm_class: type[nn.Module] = RMSNorm

    def __init__(self, cfg, attn_backend: type, max_positions: int, ops: ModelOps | None = None,
                 quant_config=None) -> None:
        """quant_config: a plexus.models.quantization config, which picks each projection's LinearMethod."""
        super().__init__()
        self.config = cfg
        self.ops = ops or ModelOps()
        self.quant_config = quant_config
        self.max_positions = max_positions
        self.embed_scale: float | None = None
        self.final_logit_softcapping: float | None = None
        linear = LinearBuilder(self.ops, quant_config, self.packed_modules_mapping)
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_positions)
        self._rotary_by_type: dict[str, RotaryEmbedding] = {}
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(cfg, attn_backend, linear, f"layers.{i}")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = self.norm_class(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = lm_head(linear, cfg.hidden_size, cfg.vocab_size, self.tie_word_embeddings)

    @staticmethod
    def layer_index(prefix: str) -> int:
        """The index of the layer make_layer builds, from its prefix "layers.{i}"."""
        return int(prefix.rsplit(".", 1)[1])

    def rotary_for(self, layer: int) -> RotaryEmbedding:
        """The rotary table of a layer: the model's one, or its layer type's where the config's rope_parameters
        are keyed by layer type (Gemma 3's local and global bases)."""
        layer_type = layer_type_of(self.config, layer)
        params = getattr(self.config, "rope_parameters", None) or {}
        if not isinstance(params.get(layer_type), dict):
            return self.rotary
        if layer_type not in self._rotary_by_type:
            self._rotary_by_type[layer_type] = RotaryEmbedding(self.config, head_dim_of(self.config),
                                                               self.max_positions, layer_type)
        return self._rotary_by_type[layer_type]

    def make_layer(self, cfg, attn_backend: type, linear: LinearBuilder, prefix: str) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, fused: bool = True) -> torch.Tensor:
        """Final hidden states [T, hidden]. fused=False keeps the layer-by-layer ops (what compiled and
        captured decode graphs trace); otherwise a decode-only step may run as the platform's one fused call
        (ModelOps.decode_layers), where the platform implements this model's decode_recipe."""
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        if self.embed_scale is not None:
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        if fused and meta.decode is not None and not meta.prefills:
            out = self.ops.decode_layers(self, hidden, positions, kv_caches, meta)
            if out is not None:
                return out
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # In the model dtype, as HF computes them; the sampler reads them in fp32.
        logits = self.lm_head(hidden)  # [N, vocab]
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

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
