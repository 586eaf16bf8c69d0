"""Which model class runs a checkpoint, from its config's architectures: the one registry every caller reads
(the worker's build_model, the GGUF converter)."""
from __future__ import annotations

from plexus.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from plexus.models.gpt_oss import GptOssForCausalLM
from plexus.models.llama import LlamaForCausalLM
from plexus.models.mixtral import MixtralForCausalLM
from plexus.models.phi3 import Phi3ForCausalLM
from plexus.models.qwen2 import Qwen2ForCausalLM
from plexus.models.qwen3 import Qwen3ForCausalLM
from plexus.models.qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,     # also the text model of Gemma3ForConditionalGeneration
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,   # Mistral's layers are Llama's, with its sliding window
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
}

# config.json's model_type -> the architecture a config without "architectures" runs as (one written from a
# bare LlamaConfig, or converted from a GGUF file).
MODEL_TYPE_TO_ARCHITECTURE = {
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


def resolve_architecture(hf_config) -> str:
    """The first of the config's architectures plexus runs; sets hf_config.architectures to it.
    Raises ValueError naming the supported ones otherwise."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures and hf_config.model_type in MODEL_TYPE_TO_ARCHITECTURE:
        architectures = [MODEL_TYPE_TO_ARCHITECTURE[hf_config.model_type]]
    supported = [arch for arch in architectures if arch in ARCHITECTURES]
    if not supported:
        named = ", ".join(architectures) or f"none (model_type {hf_config.model_type!r})"
        raise ValueError(f"the model has architecture {named}, which plexus does not support; "
                         f"supported architectures: {', '.join(sorted(ARCHITECTURES))}")
    hf_config.architectures = supported
    return supported[0]

