"""Runs the model: one worker in this process. (Tensor parallelism, one
process per rank over torch.distributed, plugs in here: the step's input and
output are plain data, core/step.py.)"""
from __future__ import annotations

from plexus.core.config import EngineConfig
from plexus.core.step import StepInput, StepOutput


class Executor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = config.platform.make_worker(config, rank=0)
        self.device = self.worker.device

    def execute_model(self, step: StepInput) -> StepOutput:
        return self.worker.execute_model(step)

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """What a LoRA adapter may target: module name -> (in_features, out_features)."""
        return self.worker.lora_targets()


def destroy_model_parallel() -> None:
    """Tear down the tensor-parallel groups (vLLM's name); plexus's are the default process group's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_distributed_environment() -> None:
    destroy_model_parallel()


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """What vLLM's examples call after `del llm`: destroy any process group, then collect the engine's
    now-unreferenced model and KV cache so their memory returns to the system (the CPU platform's weights
    and cache are anonymous mappings, unmapped when collected). An accelerator platform's allocator cache
    is its own to empty, when one lands."""
    import gc

    destroy_distributed_environment()
    gc.collect()
