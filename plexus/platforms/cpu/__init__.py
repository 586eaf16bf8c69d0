"""The CPU platform: plain torch, paged attention in torch ops."""
from __future__ import annotations

import functools
import logging
import mmap
import os

import numpy as np
import torch

from plexus.platforms.interface import Platform
from plexus.platforms.registry import hookimpl

logger = logging.getLogger("plexus")

DEFAULT_KV_CACHE_SPACE_GIB = 4.0


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 dot products (avx512_bf16 or AMX); without them bf16 matmuls are emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    supported_quantizations = ("neuron_quant",)
    auto_priority = 0

    def is_available(self) -> bool:
        return True

    def check_and_update_config(self, config) -> None:
        model = config.model
        fastest = torch.bfloat16 if cpu_has_bf16() else torch.float32
        if model.dtype_is_auto and model.dtype != fastest:
            # bf16 halves the bytes every decode step streams; without native bf16 dot products it is
            # emulated, and fp32 is faster.
            logger.info("dtype='auto' on this CPU: %s (the checkpoint is %s)", fastest, model.dtype)
            model.dtype = fastest
        elif model.dtype == torch.float16:
            # torch's fp16 matmul on CPUs without avx512_fp16 runs at well under 1 GFLOP/s.
            model.dtype = fastest
            logger.info("float16 is slow on CPU; using %s instead", model.dtype)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # Anonymous mappings are zero pages handed out lazily, so a 4 GiB cache costs nothing until used,
        # where torch.zeros would write every byte at startup (about 6 s here).
        numel = int(np.prod(shape))
        return huge_page_buffer(numel * torch.empty((), dtype=dtype).element_size()).view(dtype).view(shape)

    def materialize(self, model: torch.nn.Module) -> torch.nn.Module:
        # All weights in one huge-page arena: decode streams every weight once per step, and with 4 KiB
        # pages the TLB misses alone cost a third of the bandwidth (docs/performance.md).
        model = model.to_empty(device="cpu")
        _move_into_huge_pages(model, copy=False)
        return model

    def finalize_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if getattr(model, "quant_config", None) is not None:
            # The full-precision weights quantized layers dropped stay mapped as long as the arena lives:
            # move what the model keeps into a new arena, so the old one is freed.
            _move_into_huge_pages(model, copy=True)
        # A second copy of the matmul weights in oneDNN's blocked layout makes batched matmuls 5-45% faster
        # (docs/performance.md); the plain copy stays for the batch-1 GEMV. Kept only where it is cheap.
        from plexus import kernels

        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = getattr(model, "embed_tokens", None) if getattr(model, "lm_head", 1) is None else None
        targets = linears + ([head] if head is not None else [])
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in targets)
        if not targets or targets[0].weight.dtype != torch.bfloat16 or nbytes > _available_memory_bytes() // 4:
            return model
        for m in targets:
            m.packed_weight = kernels.pack_weight(m.weight)
        logger.info("Prepacked %.0f MiB of matmul weights for oneDNN", nbytes / (1 << 20))
        return model

    def kv_cache_budget_bytes(self, config) -> int:
        space = config.cache.kv_cache_space
        if space is None:
            # vLLM's VLLM_CPU_KVCACHE_SPACE default, but never more than half of free memory.
            return int(min(DEFAULT_KV_CACHE_SPACE_GIB * (1 << 30), _available_memory_bytes() // 2))
        return int(space * (1 << 30))


def _move_into_huge_pages(model: torch.nn.Module, copy: bool) -> None:
    """Every parameter becomes a view of one huge_page_buffer; copy=False leaves the values uninitialized."""
    params = list(model.parameters())
    aligned = [(p.numel() * p.element_size() + 63) // 64 * 64 for p in params]
    arena = huge_page_buffer(sum(aligned))
    offset = 0
    for p, size in zip(params, aligned):
        nbytes = p.numel() * p.element_size()
        view = arena[offset:offset + nbytes].view(p.dtype).view(p.shape)
        if copy:
            view.copy_(p.data)
        p.data = view
        offset += size


_HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """nbytes of zeroed memory as a uint8 tensor, 2 MiB aligned and marked for transparent huge pages
    (where the kernel allows them; plain pages otherwise). The tensor keeps the mapping alive."""
    mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE
    return raw[start:start + nbytes]


@hookimpl
def plexus_platform() -> Platform:
    return CpuPlatform()
