"""A worker owns one device's model and KV cache. It is the same torch code
on every torch device; the Platform that makes it supplies the device, the
attention backend, the model's ops and the memory budget."""
from __future__ import annotations

import logging

import torch

from plexus.core.step import StepInput, StepOutput
from plexus.platforms.interface import resolve_obj_by_qualname
from plexus.worker.model_runner import ModelRunner

logger = logging.getLogger("plexus")


def build_model(config, platform, attn_backend: type | None = None) -> torch.nn.Module:
    """The model with its weights loaded, on the platform's device. attn_backend: the platform's unless
    given (the Neuron reference backend brings its own)."""
    from plexus.models import loader
    from plexus.models.registry import ARCHITECTURES, resolve_architecture

    hf_config = config.model.hf_config
    model_cls = ARCHITECTURES[resolve_architecture(hf_config)]
    if attn_backend is None:
        attn_backend = resolve_obj_by_qualname(platform.attention_backend(config))
    ops = resolve_obj_by_qualname(platform.model_ops(config)).from_config(config)
    quant_config = quant_config_for(config)
    with torch.device("meta"):
        model = model_cls(hf_config, attn_backend, config.model.max_model_len, ops=ops, quant_config=quant_config)
    model = platform.materialize(cast_floating(model, config.model.dtype))
    model.load_weights(loader.iterate_weights(config.model.model_dir))
    return platform.finalize_model(model).eval()


def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """model.to(dtype), except parameters a quantization method keeps in its own dtype (WeightDims.dtype_fixed)."""
    for module in model.modules():
        dims = getattr(module, "dims", {})
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point() and not (name in dims and dims[name].dtype_fixed):
                tensor.data = tensor.data.to(dtype)
    return model


def quant_config_for(config):
    """The quantization method's config (plexus.models.quantization), or None. Platforms call it from
    check_and_update_config too, so a bad setting (NEURON_QUANT_DTYPE=int4) fails before anything loads."""
    if config.quantization is None:
        return None
    import dataclasses

    from plexus.models.quantization import make_quant_config

    quant = make_quant_config(config.quantization, config.env.variables(),
                              getattr(config.model.hf_config, "quantization_config", None))
    targets = config.extra.get("qlora_target_modules")
    if targets and hasattr(quant, "target_modules"):
        quant = dataclasses.replace(quant, target_modules=tuple(targets))
    return quant


def kv_bytes_per_block(config) -> int:
    """Keys and values of every layer for one block of config.cache.block_size tokens."""
    m = config.model
    return (2 * m.num_layers * config.cache.block_size * m.num_kv_heads * m.head_dim
            * torch.tensor([], dtype=m.dtype).element_size())


class Worker:
    """Two-phase start, as the executor drives it: the constructor loads the model; the engine asks every
    worker determine_num_available_blocks() and gives all of them the smallest in initialize_cache()."""

    def __init__(self, config, platform, rank: int = 0) -> None:
        self.config = config
        self.platform = platform
        self.rank = rank
        self.device = torch.device(platform.device_type)
        platform.set_num_threads(config)
        self.attn_backend = resolve_obj_by_qualname(platform.attention_backend(config))
        self.model = build_model(config, platform, self.attn_backend)
        self.lora = None
        if config.lora is not None:    # (before the KV cache, whose budget may be what is left on the device)
            from plexus.models.lora import LoRAModel

            self.lora = LoRAModel(self.model, config.lora.max_loras, config.lora.max_lora_rank,
                                  config.lora.lora_dtype or config.model.dtype, self.device)
        self.num_blocks = 0
        self.kv_caches: list[torch.Tensor] = []
        self.runner: ModelRunner | None = None

    def determine_num_available_blocks(self) -> int:
        """How many KV blocks this worker's budget holds (the engine takes the minimum over workers)."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        budget = self._kv_budget_bytes()
        per_block = kv_bytes_per_block(self.config)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {cache.block_size} tokens "
                             f"({per_block} bytes); raise kv_cache_space or gpu_memory_utilization")
        return num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache: one tensor per layer, [2 (k, v), num_blocks + 1, block_size, num_kv_heads,
        head_dim]. The extra block, never handed to the block manager, is scratch for padding rows of
        compiled graphs."""
        m, cache = self.config.model, self.config.cache
        self.num_blocks = num_blocks
        shape = (2, num_blocks + 1, cache.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [self.platform.zeros(shape, m.dtype) for _ in range(m.num_layers)]
        self.runner = ModelRunner(self.config, self.model, self.kv_caches, self.device, scratch_block=num_blocks,
                                  attn_backend=self.attn_backend, lora=self.lora)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, cache.block_size,
                    num_blocks * cache.block_size)

    def _kv_budget_bytes(self) -> int:
        return self.platform.kv_cache_budget_bytes(self.config)

    def execute_model(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        if self.lora is None:
            raise ValueError("LoRA is not enabled on this worker (enable_lora=True)")
        return self.lora.targets()

    def check_health(self) -> None:
        """Raises if this worker cannot run steps (a platform's worker may check its device here)."""
