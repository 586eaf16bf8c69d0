"""The executor: how the engine reaches its workers, without knowing how many there are or where they run.

The interface is vLLM's: `collective_rpc(method, args)` calls a method on every worker and returns each one's
answer; `execute_model(step_input)` runs one step (plain data in and out, core/step.py) and returns the first
rank's output; `determine_num_available_blocks()` asks every worker how many KV blocks its budget holds and
returns the smallest (no worker writes the engine's config); `initialize_cache(num_blocks)` gives that number to
all of them; `check_health()` raises if a worker is gone; `shutdown()` ends them.

Backends, chosen by `distributed_executor_backend` (vLLM's values):
    "uni"  the worker in this process (executor/uni.py), the default for one rank
    "mp"   one spawned process per rank (executor/mp.py), each with its own threads
"ray" (Ray actors, several machines) implements the same interface next."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from plexus.core.config import EngineConfig
from plexus.core.step import StepInput, StepOutput

BACKENDS = ("uni", "mp")


class WorkerDiedError(RuntimeError):
    """A worker process exited or stopped answering. The engine cannot go on: this is raised to the caller,
    never turned into one request's error."""


class Executor:
    # Whether steps cross a process boundary: a request's logits processors must then pickle (cloudpickle).
    uses_processes: ClassVar[bool] = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.platform.device_type)

    def collective_rpc(self, method: str | Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        """Call `method` (a worker method's name, or a function taking the worker first) on every worker; the
        answers in rank order."""
        raise NotImplementedError

    def execute_model(self, step: StepInput) -> StepOutput:
        raise NotImplementedError

    def determine_num_available_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_available_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", args=(num_blocks,))

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """What a LoRA adapter may target: module name -> (in_features, out_features)."""
        return self.collective_rpc("lora_targets")[0]

    def check_health(self) -> None:
        self.collective_rpc("check_health")

    def shutdown(self) -> None:
        """End the workers; calling it again does nothing."""


def make_executor(config: EngineConfig) -> Executor:
    backend = config.parallel.distributed_executor_backend
    if backend == "mp":
        from plexus.core.executor.mp import MultiprocExecutor

        return MultiprocExecutor(config)
    from plexus.core.executor.uni import UniProcExecutor

    return UniProcExecutor(config)


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
