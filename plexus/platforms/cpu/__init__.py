"""The CPU platform: plain torch, paged attention in torch ops."""
from __future__ import annotations

import functools
import logging
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
    auto_priority = 0

    def is_available(self) -> bool:
        return True

    def check_and_update_config(self, config) -> None:
        model = config.model
        if model.dtype == torch.float16:
            # torch's fp16 matmul on CPUs without avx512_fp16 runs at well under 1 GFLOP/s.
            model.dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
            logger.info("float16 is slow on CPU; using %s instead", model.dtype)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # numpy.zeros is calloc: the OS hands out zero pages lazily, so a 4 GiB cache costs nothing until
        # used, where torch.zeros would write every byte at startup (about 6 s here).
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = np.zeros(shape, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize])
        return torch.from_numpy(raw).view(dtype)

    def kv_cache_budget_bytes(self, config) -> int:
        space = config.cache.kv_cache_space
        if space is None:
            # vLLM's VLLM_CPU_KVCACHE_SPACE default, but never more than half of free memory.
            return int(min(DEFAULT_KV_CACHE_SPACE_GIB * (1 << 30), _available_memory_bytes() // 2))
        return int(space * (1 << 30))


@hookimpl
def plexus_platform() -> Platform:
    return CpuPlatform()
