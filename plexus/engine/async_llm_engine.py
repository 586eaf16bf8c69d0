"""vLLM's import path ``vllm.engine.async_llm_engine``."""
from plexus.core.async_engine import AsyncLLM, AsyncLLMEngine

__all__ = ["AsyncLLM", "AsyncLLMEngine"]
