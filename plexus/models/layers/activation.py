"""The activations of gated MLPs, down(act(gate(x)) * up(x)), by the name a config's hidden_act gives.

The gate and up projections are one fused layer, so act-and-mul reads its [T, 2I] output and returns [T, I];
ModelOps computes it (a platform may fuse it into the matmul, LinearLayer.silu_and_mul)."""
from __future__ import annotations

# hidden_act -> what the gated MLP runs. SiLU is the only one so far (Llama, Mistral, Qwen2, Qwen3).
GATED_ACTIVATIONS = ("silu",)


def gated_activation(hf_config) -> str:
    """The config's hidden_act, checked to be one plexus runs."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported; supported: {', '.join(GATED_ACTIVATIONS)}")
    return act
