"""The CPU platform: plexus's torch worker with the C++ kernels of kernels/ops.cpp (pure torch where they
cannot be built or PLEXUS_CPU_KERNELS=0), weights in huge pages, and oneDNN-prepacked matmul weights for
batches."""
from __future__ import annotations

import logging

import torch

from plexus.platforms import host
from plexus.platforms.interface import Platform
from plexus.platforms.registry import hookimpl

logger = logging.getLogger("plexus")


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    supported_quantizations = ("neuron_quant", "int8", "w8a8", "fp8", "awq", "gptq", "compressed-tensors",
                               "bitsandbytes", "gguf", "mxfp4")
    supports_lora = True
    auto_priority = 0

    def is_available(self) -> bool:
        return True

    def check_and_update_config(self, config) -> None:
        from plexus.worker.worker import quant_config_for

        host.apply_cpu_dtype_rules(config.model)
        quant_config_for(config)    # a bad quantization setting fails now, before the model loads

    def set_num_threads(self, config) -> None:
        cores = config.env.cpu_threads_bind     # VLLM_CPU_OMP_THREADS_BIND, as vLLM's CPU backend reads it
        if cores:
            import os

            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
            logger.info("Threads bound to cores %s", cores)

    def runs_gguf_natively(self, env) -> bool:
        """With the VNNI decode kernel (and bf16 activations) the packed weights decode 1.5-2x faster than the
        dequantized bf16 model (README, Speed); without it they would be slower."""
        from plexus.platforms.cpu import kernels

        return (env.cpu_kernels and host.cpu_has_bf16() and kernels.load(env.cache_dir)
                and kernels.fast_quant_linear_available())

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return host.lazy_zeros(shape, dtype)

    def _kernels(self, config) -> bool:
        from plexus.platforms.cpu import kernels

        return config.env.cpu_kernels and kernels.load(config.env.cache_dir)

    def model_ops(self, config) -> str:
        return "plexus.platforms.cpu.ops.CpuModelOps" if self._kernels(config) else super().model_ops(config)

    def attention_backend(self, config) -> str:
        return "plexus.platforms.cpu.ops.CpuPagedAttention" if self._kernels(config) else \
            super().attention_backend(config)

    def materialize(self, model: torch.nn.Module) -> torch.nn.Module:
        # All weights in one huge-page arena: decode streams every weight once per step, and with 4 KiB
        # pages the TLB misses alone cost a third of the bandwidth (docs/performance.md).
        model = model.to_empty(device="cpu")
        host.move_into_huge_pages(model, copy=False)
        return model

    def finalize_model(self, model: torch.nn.Module) -> torch.nn.Module:
        linears = model.linear_layers()
        if any(layer.method.quantized for layer in linears) or any(
                getattr(m, "experts_quantized", False) for m in model.modules()):
            # The full-precision weights quantized layers dropped stay mapped as long as the arena lives:
            # move what the model keeps into a new arena, so the old one is freed.
            host.move_into_huge_pages(model, copy=True)
        # A second copy of the matmul weights in oneDNN's blocked layout makes batched matmuls 5-45% faster
        # (docs/performance.md); the plain copy stays for the batch-1 GEMV. Kept only where it is cheap.
        plain = [layer for layer in linears if not layer.method.quantized and layer.weight.dtype == torch.bfloat16]
        nbytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in plain)
        if not plain or nbytes > host.available_memory_bytes() // 4:
            return model
        packed = [(layer, model.ops.pack_weight(layer.weight)) for layer in plain]
        if any(p is None for _, p in packed):
            return model
        for layer, p in packed:
            layer.packed_weight = p
        logger.info("Prepacked %.0f MiB of matmul weights for oneDNN", nbytes / (1 << 20))
        return model

    def kv_cache_budget_bytes(self, config) -> int:
        return host.kv_cache_budget_bytes(config.cache)


@hookimpl
def plexus_platform() -> Platform:
    return CpuPlatform()
