"""Rotary position embeddings with every scaling type transformers knows
(linear, llama3, yarn, longrope, ...): the inverse frequencies come from
transformers' own init functions, then cos/sin are tabulated once per
position exactly as HF computes them per call. ModelOps.rope_and_cache applies them."""
import torch
from torch import nn


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

    def to_device(self, device: torch.device) -> None:
        if self.cos.device != device:
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
