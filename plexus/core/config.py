"""The engine's typed configuration, built once by EngineArgs.create_engine_config (core/arg_utils.py).

Everything downstream takes these dataclasses; nothing else reads user settings, and the environment is
read once (plexus.envs) into EngineConfig.env."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from plexus.envs import Environment

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from plexus.platforms.interface import Platform

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}


@dataclass
class ModelConfig:
    model: str | None            # what the user asked for
    model_dir: Path              # an HF-style directory (GGUF files are converted into one)
    tokenizer: str | None
    skip_tokenizer_init: bool
    hf_config: PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    seed: int
    max_logprobs: int
    generation_config: dict
    served_model_name: str
    tokenizer_dir: Path | None = None   # where `tokenizer` resolved to (a local path or a hub snapshot)
    dtype_is_auto: bool = False      # dtype="auto": the platform may pick what it runs fastest
    tokenizer_mode: str = "auto"     # "auto" (fast tokenizer) | "slow"
    trust_remote_code: bool = False

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hf_config.hidden_size // self.hf_config.num_attention_heads

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.generation_config.get("eos_token_id"), getattr(self.hf_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(source)
        return ids


@dataclass
class CacheConfig:
    block_size: int                    # the platform's default when the user left it unset
    block_size_explicit: bool          # whether the user set it (a platform may need its own value)
    enable_prefix_caching: bool
    kv_cache_space: float | None       # GiB, CPU-style budget
    gpu_memory_utilization: float      # fraction, accelerator-style budget
    num_gpu_blocks_override: int | None


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    max_model_len: int
    policy: str = "fcfs"         # "fcfs" | "priority" (vLLM's scheduling_policy)
    # Platforms with static shapes (Neuron) serve only prompts and sequences that fit their largest compiled
    # bucket: (limit, the setting that sets it). None: max_model_len is the only limit.
    max_prompt_len: tuple[int, str] | None = None
    max_seq_len: tuple[int, str] | None = None
    max_loras: int = 0           # distinct LoRA adapters in one step (0: LoRA is off)


@dataclass
class LoRAConfig:
    """enable_lora=True: adapters in max_loras device slots of rank max_lora_rank, max_cpu_loras in host memory."""
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    lora_dtype: torch.dtype | None     # None: the model's dtype


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "uni"   # "uni" (the worker in this process) | "mp" (one process a rank)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size


@dataclass
class CompilationConfig:
    """vLLM's compilation_config, as far as it means something here. level 0: eager (on CPU the fused C++
    decode step already removes the per-op Python); level 3: decode steps run through torch.compile'd graphs
    with static shapes, one per batch-size bucket (cudagraph_capture_sizes), padded up with plexus.core.buckets."""
    level: int = 0
    cudagraph_capture_sizes: list[int] = field(default_factory=list)
    max_seq_len_to_capture: int | None = None   # longer sequences run eagerly

    KEYS: ClassVar[tuple[str, ...]] = ("level", "cudagraph_capture_sizes", "max_cudagraph_capture_size")

    @classmethod
    def parse(cls, value: Any, enforce_eager: bool, max_num_seqs: int,
              max_seq_len_to_capture: int | None = None) -> CompilationConfig:
        from plexus.core import buckets

        if isinstance(value, CompilationConfig):
            value = {"level": value.level, "cudagraph_capture_sizes": value.cudagraph_capture_sizes or None}
        if value is None:
            value = {}
        elif isinstance(value, int) and not isinstance(value, bool):
            value = {"level": value}
        elif not isinstance(value, dict):
            raise ValueError(f"compilation_config must be an int level or a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"compilation_config: unknown keys {unknown}; supported: {', '.join(cls.KEYS)}")
        level = value.get("level", 0)
        if level not in (0, 1, 2, 3):
            raise ValueError(f"compilation_config level must be 0, 1, 2 or 3, got {level!r}")
        sizes = value.get("cudagraph_capture_sizes")
        largest = value.get("max_cudagraph_capture_size")   # vLLM's: the largest size; larger batches run eagerly
        if largest is not None and (isinstance(largest, bool) or not isinstance(largest, int) or largest < 1):
            raise ValueError(f"max_cudagraph_capture_size must be a positive integer, got {largest!r}")
        sizes = (buckets.power_of_two_buckets(min(max_num_seqs, largest or max_num_seqs)) if sizes is None else
                 buckets.validate_buckets(sizes, "compilation_config.cudagraph_capture_sizes",
                                          max_value=max_num_seqs, max_name="max_num_seqs"))
        if largest is not None and sizes[-1] != min(largest, max_num_seqs):
            raise ValueError(f"max_cudagraph_capture_size={largest} must be the largest of cudagraph_capture_sizes "
                             f"({sizes[-1]})")
        return cls(level=0 if enforce_eager else level, cudagraph_capture_sizes=sizes,
                   max_seq_len_to_capture=max_seq_len_to_capture)


@dataclass
class StructuredOutputsConfig:
    """vLLM's structured_outputs_config: the engine's settings for structured outputs, which plexus runs on
    xgrammar. backend "auto" picks xgrammar; disable_any_whitespace applies to every request's JSON;
    disable_fallback and disable_additional_properties are what xgrammar does anyway (there is no other backend
    to fall back to, and objects get no properties their schema does not allow)."""
    backend: str = "auto"
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str = ""
    enable_in_reasoning: bool = False

    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "xgrammar")
    BOOLS: ClassVar[tuple[str, ...]] = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                                        "enable_in_reasoning")

    @classmethod
    def parse(cls, value: Any, guided_decoding_backend: str = "auto") -> StructuredOutputsConfig:
        """EngineArgs.structured_outputs_config (a StructuredOutputsConfig, a dict of its fields, or None) and
        vLLM's older guided_decoding_backend, checked."""
        keys = tuple(f.name for f in dataclasses.fields(cls))
        if isinstance(value, StructuredOutputsConfig):
            value = {key: getattr(value, key) for key in keys}
        elif value is None:
            value = {}
        elif not isinstance(value, dict):
            raise ValueError(f"structured_outputs_config must be a dict or a StructuredOutputsConfig, "
                             f"got {type(value).__name__}")
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ValueError(f"structured_outputs_config: unknown keys {unknown}; supported: {', '.join(keys)}")
        config = cls(**value)
        for name, backend in (("structured_outputs_config.backend", config.backend),
                              ("guided_decoding_backend", guided_decoding_backend)):
            if backend not in cls.BACKENDS:
                raise ValueError(f"{name}={backend!r} is not supported: plexus runs structured outputs on xgrammar "
                                 f"only; allowed: {', '.join(cls.BACKENDS)}")
        for name in cls.BOOLS:
            if not isinstance(getattr(config, name), bool):
                raise ValueError(f"structured_outputs_config.{name} must be a bool, got {getattr(config, name)!r}")
        if config.reasoning_parser or config.enable_in_reasoning:
            raise ValueError("structured_outputs_config: reasoning parsers (reasoning_parser, enable_in_reasoning) "
                             "are not supported; leave them unset")
        return config


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    platform: Platform
    quantization: str | None
    enforce_eager: bool
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    env: Environment = field(default_factory=Environment.read)   # every environment variable, read once
    extra: dict = field(default_factory=dict)   # platform-specific settings (e.g. override_neuron_config)
    lora: LoRAConfig | None = None   # None: LoRA is off
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)


