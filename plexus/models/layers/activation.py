"""The activations of gated MLPs, down(act(gate(x)) * up(x)), by the name a config's hidden_act gives.

The gate and up projections are one fused layer, so act-and-mul reads its [T, 2I] output and returns [T, I];
ModelOps computes SiLU's (a platform may fuse it into the matmul, LinearLayer.silu_and_mul), the others are
torch's here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# hidden_act -> what the gated MLP runs: SiLU (Llama, Mistral, Qwen, Phi-3), GELU with the tanh approximation
# (Gemma's gelu_pytorch_tanh; "gelu_new" and "gelu_fast" are the same function).
GATED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def gated_activation(hf_config, key: str = "hidden_act") -> str:
    """The config's activation (hidden_act, or Gemma's hidden_activation), checked to be one plexus runs."""
    act = getattr(hf_config, key, None) or getattr(hf_config, "hidden_act", None) or "silu"
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"{key}={act!r} is not supported; supported: {', '.join(GATED_ACTIVATIONS)}")
    return act


def act_and_mul(act: str, x: torch.Tensor) -> torch.Tensor:
    """act(x[:, :I]) * x[:, I:] for an activation other than SiLU."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
