"""Host memory and dtype rules, for every platform whose tensors live in this machine's RAM: the CPU
platform, and the Neuron platform's host side (its reference backend computes on the CPU). It belongs to
neither, so neither imports the other."""
from __future__ import annotations

import functools
import logging
import mmap
import os

import numpy as np
import torch

logger = logging.getLogger("plexus")

# vLLM's VLLM_CPU_KVCACHE_SPACE default, in GiB.
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


def available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def apply_cpu_dtype_rules(model_config) -> None:
    """dtype='auto' -> bf16 where the CPU has native bf16 dot products (it halves the bytes every decode step
    streams), fp32 otherwise; fp16 likewise, since torch's fp16 matmul on CPUs without avx512_fp16 runs at
    well under 1 GFLOP/s."""
    fastest = torch.bfloat16 if cpu_has_bf16() else torch.float32
    if model_config.dtype_is_auto and model_config.dtype != fastest:
        logger.info("dtype='auto' on this CPU: %s (the checkpoint is %s)", fastest, model_config.dtype)
        model_config.dtype = fastest
    elif model_config.dtype == torch.float16:
        model_config.dtype = fastest
        logger.info("float16 is slow on CPU; using %s instead", model_config.dtype)


def kv_cache_budget_bytes(cache_config) -> int:
    """kv_cache_space GiB when given; else vLLM's 4 GiB default, but never more than gpu_memory_utilization
    of the memory still free (a fraction of free host memory is what that setting means on the host)."""
    if cache_config.kv_cache_space is not None:
        return int(cache_config.kv_cache_space * (1 << 30))
    free_share = int(available_memory_bytes() * cache_config.gpu_memory_utilization / 2)
    return int(min(DEFAULT_KV_CACHE_SPACE_GIB * (1 << 30), free_share))


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros backed by an anonymous mapping: zero pages handed out lazily, so a 4 GiB KV cache costs nothing
    until used, where torch.zeros would write every byte at startup (about 6 s here)."""
    numel = int(np.prod(shape))
    return huge_page_buffer(numel * torch.empty((), dtype=dtype).element_size()).view(dtype).view(shape)


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


def move_into_huge_pages(model: torch.nn.Module, copy: bool) -> None:
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
