"""vLLM's import path ``vllm.sampling_params``."""
from plexus.core.sampling_params import SamplingParams, SamplingType

__all__ = ["SamplingParams", "SamplingType"]
