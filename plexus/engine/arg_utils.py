"""vLLM's import path ``vllm.engine.arg_utils``."""
from plexus.core.arg_utils import AsyncEngineArgs, EngineArgs

__all__ = ["AsyncEngineArgs", "EngineArgs"]
