"""A worker owns one device's model and KV cache. It is the same torch code
on every torch device; the Platform that makes it supplies the device, the
attention backend and the memory budget."""
from __future__ import annotations

import logging

import torch

from plexus.core.config import EngineConfig
from plexus.worker.model_runner import ModelRunner

logger = logging.getLogger("plexus")


def build_model(config: EngineConfig, platform, attn_backend: type) -> torch.nn.Module:
    from plexus.models import loader
    from plexus.models.llama import ARCHITECTURES

    hf_config = config.model.hf_config
    arch = (getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
    model_cls = ARCHITECTURES[arch]
    with torch.device("meta"):
        model = model_cls(hf_config, attn_backend, config.model.max_model_len)
    model = platform.materialize(model.to(dtype=config.model.dtype))
    model.load_weights(loader.iterate_weights(config.model.model_dir))
    if config.quant_config is not None:
        from plexus.models.quantization import quantize_model

        model = quantize_model(model, config.quant_config)
    return platform.finalize_model(model).eval()


def kv_bytes_per_block(config: EngineConfig) -> int:
    """Keys and values of every layer for one block of config.cache.block_size tokens."""
    m = config.model
    return (2 * m.num_layers * config.cache.block_size * m.num_kv_heads * m.head_dim
            * torch.tensor([], dtype=m.dtype).element_size())


class Worker:
    def __init__(self, config: EngineConfig, platform, rank: int = 0) -> None:
        self.config = config
        self.platform = platform
        self.rank = rank
        self.device = torch.device(platform.device_type)
        platform.set_num_threads(config)
        self.model = build_model(config, platform, platform.attention_backend(config))
        self.num_blocks = self._num_kv_blocks()
        config.cache.num_blocks = self.num_blocks
        m = config.model
        # One tensor per layer: [2 (k, v), num_blocks + 1, block_size, num_kv_heads, head_dim]. The extra
        # block, never handed to the block manager, is scratch for padding rows of compiled graphs.
        shape = (2, self.num_blocks + 1, config.cache.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [platform.zeros(shape, m.dtype) for _ in range(m.num_layers)]
        self.runner = ModelRunner(config, self.model, self.kv_caches, self.device, scratch_block=self.num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", self.num_blocks, config.cache.block_size,
                    self.num_blocks * config.cache.block_size)

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.config)

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        budget = self.platform.kv_cache_budget_bytes(self.config)
        num_blocks = budget // self.kv_bytes_per_block()
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {cache.block_size} tokens "
                             f"({self.kv_bytes_per_block()} bytes); raise kv_cache_space or gpu_memory_utilization")
        return num_blocks

    def execute_model(self, scheduler_output, default_generator):
        return self.runner.execute(scheduler_output, default_generator)
