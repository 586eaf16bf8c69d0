"""vLLM's import path ``vllm.config``: the engine's typed configuration (VllmConfig is plexus's
EngineConfig)."""
from plexus.core.config import (
    CacheConfig, CompilationConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig,
    StructuredOutputsConfig)

VllmConfig = EngineConfig

__all__ = ["CacheConfig", "CompilationConfig", "EngineConfig", "ModelConfig", "ParallelConfig", "SchedulerConfig",
           "StructuredOutputsConfig", "VllmConfig"]
