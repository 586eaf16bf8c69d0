"""Rotary position embeddings with every scaling type transformers knows
(linear, llama3, yarn, longrope, ...): the inverse frequencies come from
transformers' own init functions, then cos/sin are tabulated once per
position exactly as HF computes them per call."""
import torch
from torch import nn

from plexus import kernels


def _inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' (NTK scaling that changes with the sequence length) is not supported")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, "
                         + ", ".join(k for k in ROPE_INIT_FUNCTIONS if k != "dynamic"))
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        with torch.device("cpu"):   # real tables even while the model is built on the meta device
            inv_freq, scaling = _inv_freq(hf_config, head_dim)
            freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
        # Plain attributes, not buffers: they stay fp32 whatever dtype the model is cast to (as in HF),
        # and survive the model being built on the meta device.
        self.cos = emb.cos() * scaling  # [max_positions, head_dim]
        self.sin = emb.sin() * scaling

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, Hq, D], k: [T, Hkv, D]
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def apply_and_cache(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """Rotates q and k of the fused qkv rows [T, (Hq + 2 Hkv) * D], writes k and v into their cache
        slots (cache: [2, num_blocks, block_size, Hkv, D]) and returns the rotated q as [T, Hq, D]."""
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        if kernels.available(qkv) and qkv.dtype == kv_cache.dtype and kv_cache.is_contiguous():
            return torch.ops.plexus.rope_and_cache(qkv, positions, self.cos, self.sin, kv_cache, slot_mapping,
                                                   num_heads, num_kv_heads, head_dim)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = self(positions, q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim))
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.reshape(k.shape))
        return q
