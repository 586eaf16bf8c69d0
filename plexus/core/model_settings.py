"""What the model's settings make of its checkpoint: vLLM's hf_overrides applied to config.json, the dtype,
the context length, the KV blocks a byte budget holds, the name the server reports."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

import plexus.model_files as model_files
from plexus.core.config import DTYPES

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from plexus.core.config import EngineConfig


def override_hf_config(hf_config: PretrainedConfig, overrides: Any) -> PretrainedConfig:
    """vLLM's hf_overrides: a dict merged into config.json's values (a dict for a sub-config updates it), or a
    callable that takes the config and returns it."""
    if overrides is None:
        return hf_config
    if callable(overrides):
        return overrides(hf_config)
    if not isinstance(overrides, dict):
        raise ValueError(f"hf_overrides must be a dict or a callable, got {type(overrides).__name__}")
    for key, value in overrides.items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and hasattr(current, "to_dict"):     # a sub-config (text_config, ...)
            current.update(value)
        else:
            setattr(hf_config, key, value)
    return hf_config


def kv_blocks_in(nbytes: int, config: EngineConfig) -> int:
    """How many KV blocks kv_cache_memory_bytes holds: keys and values of every layer, block_size tokens each."""
    m = config.model
    per_block = (2 * m.num_layers * config.cache.block_size * m.num_kv_heads * m.head_dim
                 * torch.empty((), dtype=m.dtype).element_size())
    if nbytes < per_block:
        raise ValueError(f"kv_cache_memory_bytes={nbytes} holds no KV block of {config.cache.block_size} tokens "
                         f"({per_block} bytes)")
    return nbytes // per_block


def parse_dtype(dtype: str | torch.dtype, hf_config: PretrainedConfig) -> torch.dtype:
    """'auto' -> the checkpoint's dtype (the platform may then refine it)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; allowed: auto, float32, bfloat16, float16")
        return dtype
    if dtype == "auto":
        return model_files.checkpoint_dtype(hf_config)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def max_model_len(hf_config: PretrainedConfig, requested: int | None, disable_sliding_window: bool = False) -> int:
    """The context length: max_position_embeddings, or what was asked within it. Sliding windows are the
    layers' own (each attends over its window, the context stays whole); disable_sliding_window=True (vLLM's)
    caps the context at the window instead and makes every layer attend over all of it, which within the
    window is the same."""
    derived = getattr(hf_config, "max_position_embeddings", None) or 2048
    source = "max_position_embeddings in config.json"
    window = getattr(hf_config, "sliding_window", None)
    if disable_sliding_window and window:
        if window < derived:
            derived, source = window, "sliding_window in config.json, as disable_sliding_window=True asks"
        hf_config.sliding_window = None
    if requested is None:
        return derived
    if requested > derived:
        raise ValueError(f"max_model_len={requested} is larger than the model's maximum context length "
                         f"({derived}, {source})")
    return requested


def first_name(names: str | list[str] | None) -> str | None:
    """served_model_name may be a list (vLLM's server serves one model under several names); the first is the
    one responses report."""
    if isinstance(names, (list, tuple)):
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"served_model_name must be a non-empty string or list of them, got {names!r}")
        return names[0]
    return names
