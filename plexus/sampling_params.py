"""vLLM's import path ``vllm.sampling_params``."""
from plexus.core.sampling_params import (
    BeamSearchParams, GuidedDecodingParams, RequestOutputKind, SamplingParams, SamplingType, StructuredOutputsParams)

__all__ = ["BeamSearchParams", "GuidedDecodingParams", "RequestOutputKind", "SamplingParams", "SamplingType",
           "StructuredOutputsParams"]
