"""plexus: an LLM inference engine with vLLM's API and pluggable platforms."""
import plexus.logger  # noqa: F401  (installs the default handler first)
from plexus.core.config import EngineArgs
from plexus.core.engine import LLMEngine
from plexus.core.outputs import CompletionOutput, Logprob, RequestOutput
from plexus.core.sampling_params import SamplingParams
from plexus.entrypoints.llm import LLM
from plexus.core.inputs import PromptType, TextPrompt, TokensPrompt
from plexus.core.lora.request import LoRARequest

__version__ = "0.1.0"

__all__ = [
    "LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
    "LoRARequest", "PromptType", "TextPrompt", "TokensPrompt",
]
