"""vLLM's import path ``vllm.distributed.parallel_state``."""
from plexus.core.executor import destroy_distributed_environment, destroy_model_parallel

__all__ = ["destroy_distributed_environment", "destroy_model_parallel"]
