"""vLLM's import path ``vllm.utils`` (FlexibleArgumentParser)."""
from plexus.entrypoints.arg_parser import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
