"""vLLM's import path ``vllm.engine.llm_engine``."""
from plexus.core.engine import LLMEngine

__all__ = ["LLMEngine"]
