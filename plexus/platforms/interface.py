"""The contract every device implements. The core asks the platform; it never
branches on a device name.

The interface names implementations by their qualified names (the worker
class, the attention backend, the model's ops) instead of importing them, so
it depends on nothing in plexus: the core can hold a Platform without pulling
in any model or device code."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from plexus.core.config import EngineConfig


def resolve_obj_by_qualname(qualname: str) -> Any:
    """"package.module.Name" -> the object."""
    module_name, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


class Platform:
    """A device plugin. Subclass it, and return an instance from a
    ``plexus_platform`` hook registered under the ``plexus.platforms``
    entry-point group."""

    name: ClassVar[str]
    device_type: ClassVar[str]  # the torch device string
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    supported_quantizations: ClassVar[tuple[str, ...]] = ()
    supports_lora: ClassVar[bool] = False
    supports_paged_kv: ClassVar[bool] = True
    # Whether the model returns logits for every prompt position (prompt_logprobs), not only the last.
    supports_prompt_logprobs: ClassVar[bool] = True
    # block_size when the user leaves it unset (vLLM's 16 on paged-KV devices).
    default_block_size: ClassVar[int] = 16
    # Higher wins under device="auto" among the available platforms.
    auto_priority: ClassVar[int] = 0
    # The worker that owns the model and the KV cache: plexus's torch worker unless the platform has its own.
    worker_cls: ClassVar[str] = "plexus.worker.worker.Worker"

    def is_available(self) -> bool:
        """Cheap: may not import heavy SDKs or touch the device."""
        raise NotImplementedError

    def is_available_for(self, options: dict) -> bool:
        """Whether an explicitly requested device can serve these engine options (e.g. Neuron's CPU
        reference backend runs without the SDK). options: EngineConfig.extra's keys."""
        return self.is_available()

    def unavailable_reason(self) -> str:
        return f"the {self.name} platform is not available on this machine"

    def max_tensor_parallel_size(self) -> int:
        return 1

    def runs_gguf_natively(self, env) -> bool:
        """Whether a GGUF file of Q8_0 / Q4_0 / Q4_1 weights, given with quantization and dtype unset, runs as
        stored (quantization='gguf') because that is faster here than the dequantized model (env: the
        engine's plexus.envs.Environment)."""
        return False

    def check_and_update_config(self, config: EngineConfig) -> None:
        """Fix or refuse settings the device can't serve. Raise ValueError
        naming the setting and what is allowed."""

    def kv_cache_budget_bytes(self, config: EngineConfig) -> int:
        """How many bytes the KV cache may take on this device."""
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled tensor on this device (the KV cache: attention reads
        masked padding slots, where uninitialized NaNs would leak through)."""
        return torch.zeros(shape, dtype=dtype, device=self.device_type)

    def materialize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Give a model built on the meta device real (uninitialized) storage on this device."""
        return model.to_empty(device=self.device_type)

    def finalize_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the weights are loaded: device-specific layouts (e.g. prepacked matmul weights)."""
        return model

    def make_worker(self, config: EngineConfig, rank: int = 0) -> Any:
        """The worker that owns the model and the KV cache on this device: an object with
        execute_model(StepInput) -> StepOutput and a `device`."""
        return resolve_obj_by_qualname(self.worker_cls)(config, self, rank)

    def attention_backend(self, config: EngineConfig) -> str:
        """The qualified name of the paged attention class the model uses."""
        return "plexus.models.layers.attention.TorchPagedAttention"

    def model_ops(self, config: EngineConfig) -> str:
        """The qualified name of the model's ModelOps class (elementwise ops, matmuls, sampling fast paths,
        an optional fused decode step); built with its from_config(config). Plain torch by default."""
        return "plexus.models.layers.ops.ModelOps"

    def distributed_backend(self) -> str | None:
        return None

    def set_num_threads(self, config: EngineConfig) -> None:
        """Process-wide settings before the model loads (threads, allocator)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device_type={self.device_type!r})"
