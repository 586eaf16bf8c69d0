"""vLLM's import path ``vllm.lora.request``."""
from plexus.core.lora.request import LoRARequest

__all__ = ["LoRARequest"]
