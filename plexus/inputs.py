"""vLLM's import path ``vllm.inputs``."""
from plexus.core.inputs import PromptType, TextPrompt, TokensPrompt

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
