"""The Llama family (Llama 1-3, Mistral, Qwen2, SmolLM, TinyLlama) in plain torch.

Tokens of all requests in a step are flattened into one [T] batch; attention
reads and writes the paged KV cache through AttentionMetadata. Every
projection is a LinearLayer whose LinearMethod the quantization config picks
per layer; q/k/v and gate/up are fused layers, loaded shard by shard from the
checkpoint's separate tensors. Elementwise ops come from the platform's
ModelOps (pure torch by default)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from plexus.models.layers.attention import AttentionMetadata
from plexus.models.layers.linear import LinearLayer, LinearMethod
from plexus.models.layers.norm import RMSNorm
from plexus.models.layers.ops import ModelOps
from plexus.models.layers.rotary import RotaryEmbedding

# HF checkpoint module name -> (our fused module, shard index)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _linear_for(modules: dict[str, nn.Module], name: str) -> tuple[LinearLayer | None, str, int | None]:
    """The LinearLayer a checkpoint tensor belongs to, the parameter name within it (which may have dots,
    as bitsandbytes' "weight.absmax"), and its shard of a fused layer."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path, shard = parts[:end], None
        if path[-1] in _FUSED:
            path = path[:-1] + [_FUSED[path[-1]][0]]
            shard = _FUSED[parts[end - 1]][1]
        module = modules.get(".".join(path))
        if isinstance(module, LinearLayer):
            return module, ".".join(parts[end:]), shard
    return None, "", None


class _Builder:
    """Makes each LinearLayer with the method the quantization config picks for its checkpoint names."""

    def __init__(self, ops: ModelOps, quant_config) -> None:
        self.ops, self.quant_config = ops, quant_config

    def linear(self, prefix: str, input_size: int, output_sizes: list[int], bias: bool) -> LinearLayer:
        method: LinearMethod | None = None
        if self.quant_config is not None:
            parent, _, name = prefix.rpartition(".")
            shards = [f"{parent}.{s}" if parent else s for s in _SHARDS.get(name, (name,))]
            method = self.quant_config.linear_method(prefix, shards)
        return LinearLayer(input_size, output_sizes, bias, method=method, ops=self.ops)


class LlamaAttention(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding, attn_backend: type, build: _Builder, prefix: str) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = build.linear(f"{prefix}.qkv_proj", cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     bias=bias or cfg.model_type == "qwen2")
        self.o_proj = build.linear(f"{prefix}.o_proj", self.q_size, [cfg.hidden_size], bias=bias)
        self.rotary = rotary
        self.ops = build.ops
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        self.rotary.to_device(positions.device)
        q = self.ops.rope_and_cache(qkv, positions, self.rotary.cos, self.rotary.sin, kv_cache, meta.slot_mapping,
                                    self.num_heads, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg, build: _Builder, prefix: str) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; the Llama family uses 'silu'")
        bias = bool(getattr(cfg, "mlp_bias", False))
        inter = cfg.intermediate_size
        self.gate_up_proj = build.linear(f"{prefix}.gate_up_proj", cfg.hidden_size, [inter, inter], bias)
        self.down_proj = build.linear(f"{prefix}.down_proj", inter, [cfg.hidden_size], bias)
        self.ops = build.ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, rotary, attn_backend, build: _Builder, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, attn_backend, build, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(cfg, build, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.ops)

    def forward(self, positions, hidden, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried separately so each add fuses into the next norm."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg, attn_backend: type, max_positions: int, ops: ModelOps | None = None,
                 quant_config=None) -> None:
        """quant_config: a plexus.models.quantization config, which picks each projection's LinearMethod."""
        super().__init__()
        self.config = cfg
        self.ops = ops or ModelOps()
        self.quant_config = quant_config
        build = _Builder(self.ops, quant_config)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = RotaryEmbedding(cfg, head_dim, max_positions)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_delta = None      # an additive per-token term on the embeddings (LoRA), as LinearLayer.delta
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary, attn_backend, build, f"layers.{i}")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = build.linear("lm_head", cfg.hidden_size, [cfg.vocab_size], bias=False)
        if self.tie_word_embeddings:
            del self.lm_head.weight      # the embedding's, tied in load_weights: no storage of its own
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, fused: bool = True) -> torch.Tensor:
        """Final hidden states [T, hidden]. fused=False keeps the layer-by-layer ops (what torch.compile
        traces for compiled decode graphs); otherwise a decode-only step may run as the platform's one fused
        call (ModelOps.decode_layers)."""
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        if self.embed_delta is not None:
            hidden = hidden + self.embed_delta(input_ids).to(hidden.dtype)
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
            for shard, shard_name in enumerate(_SHARDS.get(name, (name,))):
                out[f"{parent}.{shard_name}" if parent else shard_name] = (module, shard)
        return out

    def linear_layers(self) -> list[LinearLayer]:
        return [m for m in self.modules() if isinstance(m, LinearLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.tie_word_embeddings:
            # Tied here, once the model has its storage: moving a model between devices unties parameters.
            self.lm_head.weight = self.embed_tokens.weight
            self.lm_head.mark_loaded("weight")
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            name = name.removeprefix("model.")
            if name.startswith("lm_head.") and self.tie_word_embeddings:
                continue  # tied: the embedding serves as the head
            module, param_name, shard = _linear_for(modules, name)
            if module is not None:
                module.load_weight(param_name, tensor, shard, source=name)
            elif name in params:
                if params[name].shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].data.copy_(tensor)
                loaded.add(name)
            else:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        linear_prefixes = {prefix for prefix, m in modules.items() if isinstance(m, LinearLayer)}
        missing = [p for p in params if p.rpartition(".")[0] not in linear_prefixes and p not in loaded]
        for prefix in sorted(linear_prefixes):
            missing += [f"{prefix}.{w}" for w in modules[prefix].missing_weights()]
        if missing:
            raise ValueError(f"the checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for layer in self.linear_layers():
            layer.method.process_weights_after_loading(layer)
