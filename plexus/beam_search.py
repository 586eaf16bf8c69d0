"""vLLM's import path ``vllm.beam_search``."""
from plexus.entrypoints.beam_search import BeamSearchOutput, BeamSearchSequence

__all__ = ["BeamSearchOutput", "BeamSearchSequence"]
