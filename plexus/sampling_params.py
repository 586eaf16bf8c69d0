"""vLLM's import path ``vllm.sampling_params``."""
from plexus.core.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams, SamplingType

__all__ = ["BeamSearchParams", "RequestOutputKind", "SamplingParams", "SamplingType"]
