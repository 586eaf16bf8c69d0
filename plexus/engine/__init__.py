"""vLLM's import path ``vllm.engine``."""
