"""Rotary position embeddings with every scaling type transformers knows (linear, llama3, yarn, longrope, ...):
the inverse frequencies come from transformers' own init functions, then cos/sin are tabulated once per
position exactly as HF computes them per call. ModelOps.rope_and_cache applies them.

A table covers the rotary part of a head: all of it, or its first partial_rotary_factor (Phi-3, gpt-oss's
full); models whose layers differ in RoPE (Gemma 3's local and global layers) keep one table per layer type,
as their config's rope_parameters are keyed by it. LongRoPE (Phi-3.5/4) has a short and a long factor; as in
vLLM, one of them serves the whole context: the long one when the context (max_positions, the engine's
max_model_len) reaches past original_max_position_embeddings, else the short one. HF picks per forward, the
long factor once the sequence is longer than that: the same wherever a sequence stays on one side."""
import torch
from torch import nn


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    """The config's RoPE settings for a layer type (Gemma 3 keys them by it), rope_theta included."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def _inv_freq(hf_config, head_dim: int, layer_type: str | None, seq_len: int | None = None
              ) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", "default")
    keyed = layer_type if isinstance((getattr(hf_config, "rope_parameters", None) or {}).get(layer_type), dict) \
        else None
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor",
                                        getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0))
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' (NTK scaling that changes with the sequence length) is not supported")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, "
                         + ", ".join(k for k in ROPE_INIT_FUNCTIONS if k != "dynamic"))
    kwargs = {"layer_type": keyed} if keyed is not None else {}
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", seq_len=seq_len, **kwargs)


def _table(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs, freqs), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int, layer_type: str | None = None) -> None:
        super().__init__()
        with torch.device("cpu"):   # real tables even while the model is built on the meta device
            params = rope_parameters(hf_config, layer_type)
            long_context = (params.get("rope_type") == "longrope"
                            and max_positions > int(params["original_max_position_embeddings"]))
            inv_freq, scaling = _inv_freq(hf_config, head_dim, layer_type,
                                          seq_len=max_positions if long_context else None)
            emb = _table(inv_freq, torch.arange(max_positions))
        # Plain attributes, not buffers: they stay fp32 whatever dtype the model is cast to (as in HF),
        # and survive the model being built on the meta device.
        self.cos = emb.cos() * scaling  # [max_positions, rotary_dim]
        self.sin = emb.sin() * scaling
        self.rotary_dim = emb.shape[-1]

    def to_device(self, device: torch.device) -> None:
        if self.cos.device != device:
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
