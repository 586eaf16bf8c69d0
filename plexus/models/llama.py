"""The Llama family (Llama 1-3, Mistral, Qwen2, SmolLM, TinyLlama) in plain torch.

Tokens of all requests in a step are flattened into one [T] batch; attention
reads and writes the paged KV cache through AttentionMetadata. q/k/v and
gate/up projections are fused into one matmul each at load time."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from plexus import kernels
from plexus.models.layers.attention import AttentionMetadata
from plexus.models.layers.norm import RMSNorm
from plexus.models.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding, attn_backend: type) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=bool(getattr(cfg, "attention_bias", False)))
        self.rotary = rotary
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = kernels.linear_module(self.qkv_proj, x)
        q = self.rotary.apply_and_cache(positions, qkv, kv_cache, meta.slot_mapping,
                                        self.num_heads, self.num_kv_heads, self.head_dim)
        return kernels.linear_module(self.o_proj, self.attn(q, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; the Llama family uses 'silu'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = kernels.linear_module(self.gate_up_proj, x)
        return kernels.linear_module(self.down_proj, kernels.silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, rotary, attn_backend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, attn_backend)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

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
    # HF checkpoint name -> (our parameter, shard index within the fused parameter)
    _fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg, attn_backend: type, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = RotaryEmbedding(cfg, head_dim, max_positions)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary, attn_backend)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._decode_weights: list[torch.Tensor | None] | None = None   # for the fused decode kernel
        self.quant_config = None   # set by plexus.models.quantization.quantize_model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, fused: bool = True) -> torch.Tensor:
        """fused=False keeps the layer-by-layer ops (what torch.compile traces for compiled decode graphs)."""
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        # The fused C++ step reads unquantized weights.
        if (fused and self.quant_config is None and not meta.prefills
                and kernels.fused_decode_available(hidden, kv_caches)):
            return self._fused_decode(hidden, positions, kv_caches, meta)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        return self.norm(hidden, residual)[0]

    def _fused_decode(self, hidden, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """All layers of a step of one-token sequences in one C++ call (plexus/kernels/cpu/ops.cpp)."""
        if self._decode_weights is None:
            self._decode_weights = []
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self._decode_weights.append(layer.input_layernorm.weight)
                for linear in (attn.qkv_proj, attn.o_proj):
                    self._decode_weights += [linear.weight, linear.bias, getattr(linear, "packed_weight", None)]
                self._decode_weights.append(layer.post_attention_layernorm.weight)
                for linear in (mlp.gate_up_proj, mlp.down_proj):
                    self._decode_weights += [linear.weight, linear.bias, getattr(linear, "packed_weight", None)]
        attn = self.layers[0].self_attn
        return torch.ops.plexus.llama_decode_layers(
            hidden, positions, meta.slot_mapping, meta.decode.block_tables, meta.decode.seq_lens,
            self.rotary.cos, self.rotary.sin, kv_caches, self._decode_weights, self.norm.weight, self.norm.eps,
            attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.attn.scale,
            kernels.FAST_LINEAR_MAX_ROWS, kernels.FAST_LINEAR_MAX_ROWS_UNPACKED)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        # In the model dtype, as HF computes them; the sampler reads them in fp32.
        return kernels.linear(hidden, head.weight, None, getattr(head, "packed_weight", None))  # [N, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name.startswith("model."):
                name = name[len("model."):]
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the head
            parts = name.split(".")
            target, shard = name, None
            for i, part in enumerate(parts):
                if part in self._fused:
                    fused, shard = self._fused[part]
                    target = ".".join(parts[:i] + [fused] + parts[i + 1:])
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if shard is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(param.shape)}")
                param.data.copy_(tensor)
            else:
                offset, size = self._shard_range(target, shard)
                if tensor.shape[0] != size or tensor.shape[1:] != param.shape[1:]:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected ({size}, {', '.join(map(str, param.shape[1:]))})")
                param.data[offset:offset + size].copy_(tensor)
                target = f"{target}#{shard}"
            loaded.add(target)
        expected = set()
        for pname in params:
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in f".{pname}"), None)
            if fused is None:
                expected.add(pname)
            else:
                expected.update(f"{pname}#{i}" for i in range(3 if fused == "qkv_proj" else 2))
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"the checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _shard_range(self, target: str, shard: int) -> tuple[int, int]:
        layer = self.layers[0]
        if "qkv_proj" in target:
            q, kv = layer.self_attn.q_size, layer.self_attn.kv_size
            return [(0, q), (q, kv), (q + kv, kv)][shard]
        inter = layer.mlp.intermediate_size
        return [(0, inter), (inter, inter)][shard]


ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
