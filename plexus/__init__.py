"""plexus: an LLM inference engine with vLLM's API and pluggable platforms."""
import plexus.logger  # noqa: F401  (installs the default handler first)
from plexus.core.arg_utils import AsyncEngineArgs, EngineArgs
from plexus.core.async_engine import AsyncLLM, AsyncLLMEngine
from plexus.core.engine import LLMEngine
from plexus.core.inputs import PromptType, TextPrompt, TokensPrompt
from plexus.core.lora.request import LoRARequest
from plexus.core.outputs import CompletionOutput, Logprob, RequestOutput
from plexus.core.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from plexus.entrypoints.llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM", "LLMEngine", "AsyncLLMEngine", "AsyncLLM", "EngineArgs", "AsyncEngineArgs", "SamplingParams", "BeamSearchParams", "RequestOutputKind",
    "RequestOutput", "CompletionOutput", "Logprob", "LoRARequest", "PromptType", "TextPrompt", "TokensPrompt",
]
