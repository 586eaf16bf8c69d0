"""The CUDA platform: plexus's torch worker on an NVIDIA GPU, with Triton kernels for paged attention and the
rotary/cache write (triton_kernels.py), decode steps replayed from CUDA graphs captured per batch-size bucket
(graphs.py), a KV cache sized from gpu_memory_utilization after a profiling forward pass (worker.py), and
the quantized linears torch has GPU kernels for (ops.py).

Nothing here touches the GPU until a worker is built: is_available() asks torch.cuda, which counts devices
without creating a context. The guide: docs/cuda.md."""
from __future__ import annotations

import logging

import torch

from plexus.platforms.interface import Platform
from plexus.platforms.registry import hookimpl

logger = logging.getLogger("plexus")


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    # Methods whose layers run on CUDA tensors: int8 / w8a8 through torch._int_mm, AWQ / GPTQ / compressed-
    # tensors' 4-bit weights through torch's int4 tinygemm (bf16) or dequantize + matmul, fp8 and GGUF through
    # dequantize + matmul. bitsandbytes' layers are built for its CPU layout here.
    supported_quantizations = ("neuron_quant", "int8", "w8a8", "fp8", "awq", "gptq", "compressed-tensors", "gguf",
                               "mxfp4")
    supports_lora = True
    auto_priority = 50          # under neuron (100), over cpu (0)
    worker_cls = "plexus.platforms.cuda.worker.CudaWorker"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        if torch.version.cuda is None:
            return (f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch "
                    "(https://pytorch.org/get-started/locally/)")
        return "no CUDA GPU is visible (torch.cuda.is_available() is False; check the driver and CUDA_VISIBLE_DEVICES)"

    def distributed_backend(self) -> str | None:
        return "nccl"

    def check_and_update_config(self, config) -> None:
        from plexus.worker.worker import quant_config_for

        model = config.model
        if model.dtype == torch.bfloat16 and not _bf16_supported():
            if not model.dtype_is_auto:
                raise ValueError(f"dtype='bfloat16' needs a GPU of compute capability 8.0 or newer; this one is "
                                 f"{_capability()}: use dtype='float16' or 'float32'")
            logger.info("dtype='auto': this GPU (compute capability %s) has no bf16; using float16", _capability())
            model.dtype = torch.float16
        quant_config_for(config)    # a bad quantization setting fails now, before the model loads

    def kv_cache_budget_bytes(self, config) -> int:
        """This engine's share of the GPU (gpu_memory_utilization, per engine as in vLLM V1), less what it holds
        now (the weights). The worker also subtracts the peak activations of its profiling pass."""
        _, total = torch.cuda.mem_get_info()
        return int(total * config.cache.gpu_memory_utilization) - torch.cuda.memory_reserved()

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device_type)

    def attention_backend(self, config) -> str:
        return "plexus.platforms.cuda.attention.TritonPagedAttention"

    def model_ops(self, config) -> str:
        return "plexus.platforms.cuda.ops.CudaModelOps"


def _capability() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _bf16_supported() -> bool:
    return torch.cuda.get_device_capability()[0] >= 8


@hookimpl
def plexus_platform() -> Platform:
    return CudaPlatform()
