"""vLLM's import path ``vllm.utils.argparse_utils``."""
from plexus.entrypoints.arg_parser import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
