"""EngineArgs: the engine's settings with vLLM's names and defaults (vLLM's vllm.engine.arg_utils), and
their validation into an EngineConfig. Every field is honoured or refused when set; none is ignored."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import plexus.model_files as model_files
from plexus.core import model_settings
from plexus.core.config import (
    DTYPES, CacheConfig, CompilationConfig, EngineConfig, LoRAConfig, ModelConfig, ParallelConfig, SchedulerConfig,
    StructuredOutputsConfig)
from plexus.core.engine_flags import add_engine_flags
from plexus.core.unsupported_settings import UNSUPPORTED
from plexus.envs import Environment
from plexus.model_files.hf_config import quantization_method

# vLLM's allowed max_lora_rank values.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

if TYPE_CHECKING:
    from transformers import PretrainedConfig


logger = logging.getLogger("plexus")


def _with_unsupported_settings(cls: type) -> type:
    """Every vLLM setting plexus does not act on (core/unsupported_settings.py) becomes a field at vLLM's
    default, after the fields plexus acts on, so a vLLM script that passes one runs and any other value is
    refused by _refuse_unsupported."""
    for name, setting in UNSUPPORTED.items():
        if name not in cls.__annotations__:
            cls.__annotations__[name] = setting.type
            setattr(cls, name, setting.default)
    return cls


@dataclass
@_with_unsupported_settings
class EngineArgs:
    """The engine's settings, with vLLM's names and defaults: those plexus acts on here, and every other
    setting of vLLM's EngineArgs (core/unsupported_settings.py), accepted at its default and refused otherwise."""

    model: str | None = None
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    dtype: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    disable_sliding_window: bool = False     # True: the context capped at the window, attended in full
    max_num_seqs: int = 256             # vLLM's None means this default too
    max_num_batched_tokens: int | None = None
    block_size: int | None = None       # None: the platform's default (16; max_model_len on Neuron)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"     # "fcfs" | "priority" (lower priority values run first)
    device: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None   # "uni" | "mp"; None: "uni" for one rank, else "mp"
    kv_cache_space: float | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enforce_eager: bool = False
    compilation_config: int | dict | None = None
    max_seq_len_to_capture: int = 8192
    disable_log_stats: bool = False    # LLM() turns it on, as vLLM's does
    max_logprobs: int = 20
    revision: str | None = None
    tokenizer_revision: str | None = None
    served_model_name: str | list[str] | None = None    # the server's names for the model; the first is reported
    generation_config: str = "auto"
    load_format: str = "auto"
    download_dir: str | None = None
    disable_custom_all_reduce: bool = False   # plexus has no custom all-reduce kernel: True is what it does
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: str = "auto"
    qlora_adapter_name_or_path: str | None = None
    override_neuron_config: dict | None = None
    # Structured outputs (xgrammar): vLLM's structured_outputs_config ({"backend": "auto" | "xgrammar",
    # "disable_any_whitespace": ...}; on the command line also --structured-outputs-config.backend xgrammar),
    # and its older guided_decoding_backend.
    structured_outputs_config: dict | StructuredOutputsConfig | None = None
    guided_decoding_backend: str = "auto"
    hf_token: bool | str | None = None           # the hub token: True, the stored login's; a string, that token
    hf_overrides: dict | None = None             # merged into config.json's values (a callable may edit the config)
    override_generation_config: dict | None = None   # merged over generation_config.json's sampling defaults
    cudagraph_capture_sizes: list[int] | None = None     # compilation_config's, as vLLM's top-level flag
    max_cudagraph_capture_size: int | None = None        # the largest compiled batch; larger ones run eagerly
    kv_cache_memory_bytes: int | None = None     # the KV cache's size in bytes, instead of the platform's budget
    log_level: str | None = None                 # the "plexus" logger's level: debug, info, warning, error

    def __post_init__(self) -> None:
        # vLLM's None for these means "the default", as here.
        for name in ("max_num_seqs", "enable_prefix_caching", "enable_chunked_prefill"):
            if getattr(self, name) is None:
                setattr(self, name, next(f.default for f in dataclasses.fields(self) if f.name == name))

    @classmethod
    def from_kwargs(cls, caller: str, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{caller}() got an unknown keyword argument {key!r}{hint}")
        return cls(**kwargs)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """One flag per field (vLLM's --kebab-case names), typed from its annotation."""
        return add_engine_flags(parser, dataclasses.fields(EngineArgs))

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def create_engine_config(self) -> EngineConfig:
        from plexus.platforms.registry import resolve_platform

        self._check_ranges()
        self._refuse_unsupported()
        structured_outputs = StructuredOutputsConfig.parse(self.structured_outputs_config, self.guided_decoding_backend)
        env = Environment.read()
        extra = {"override_neuron_config": self.override_neuron_config}
        platform = resolve_platform(self.device, extra)
        if self.override_neuron_config is not None and platform.name != "neuron":
            raise ValueError(f"override_neuron_config applies to device='neuron' only; this engine runs on the "
                             f"{platform.name} platform")
        hub = model_files.HubOptions(cache_dir=Path(self.download_dir) if self.download_dir else env.hub_cache_dir,
                                     offline=env.hub_offline, token=self.hf_token)
        if self._runs_gguf_natively(platform, env):
            logger.info("Running the GGUF file's quantized weights as stored (quantization='gguf'); set dtype= "
                        "to run it dequantized")
            return dataclasses.replace(self, quantization="gguf").create_engine_config()
        model_dir = model_files.resolve_model_dir(self.model, env.cache_dir, hub, self.revision, self.quantization)
        tokenizer_dir = None
        if self.tokenizer is not None and not self.skip_tokenizer_init:
            tokenizer_dir = model_files.resolve_tokenizer_dir(self.tokenizer, hub, self.tokenizer_revision)
        hf_config = model_files.text_model_config(model_settings.override_hf_config(
            model_files.load_config(model_dir, trust_remote_code=self.trust_remote_code), self.hf_overrides))
        self._check_load_format(model_dir, hf_config)
        max_model_len = model_settings.max_model_len(hf_config, self.max_model_len, self.disable_sliding_window)
        if self.max_num_batched_tokens is not None:
            max_batched = self.max_num_batched_tokens
        elif self.enable_chunked_prefill:
            max_batched = 2048
        else:
            max_batched = max(max_model_len, 2048)
        if not self.enable_chunked_prefill and max_batched < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len ({max_model_len}); "
                "without chunked prefill a whole prompt must fit in one step: raise max_num_batched_tokens, "
                "lower max_model_len, or set enable_chunked_prefill=True")
        quantization = self._quantization(hf_config)
        if quantization is not None and quantization not in platform.supported_quantizations:
            allowed = ", ".join(platform.supported_quantizations) or "none"
            asked = (f"quantization={quantization!r} is" if self.quantization is not None else
                     f"this checkpoint is quantized with quant_method={quantization!r} (config.json "
                     "quantization_config), which is")
            raise ValueError(f"{asked} not supported on the {platform.name} platform; it runs: {allowed}")
        if self.tensor_parallel_size > platform.max_tensor_parallel_size():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} exceeds what the {platform.name} "
                             f"platform supports ({platform.max_tensor_parallel_size()})")
        generation_config = {**self._generation_config(model_dir), **(self.override_generation_config or {})}
        model_dtype = model_settings.parse_dtype(self.dtype, hf_config)
        lora = self._lora_config(platform)
        if self.qlora_adapter_name_or_path:
            if quantization != "bitsandbytes":
                raise ValueError(f"qlora_adapter_name_or_path quantizes the base with bitsandbytes as the QLoRA "
                                 f"adapter was trained; it needs quantization='bitsandbytes', got {quantization!r}")
            extra["qlora_target_modules"] = _qlora_target_modules(self.qlora_adapter_name_or_path, hub)
        config = EngineConfig(
            model=ModelConfig(
                model=self.model, model_dir=model_dir, tokenizer=self.tokenizer,
                skip_tokenizer_init=self.skip_tokenizer_init, hf_config=hf_config,
                dtype=model_dtype, max_model_len=max_model_len,
                seed=0 if self.seed is None else self.seed, max_logprobs=self.max_logprobs,
                generation_config=generation_config,
                served_model_name=(model_settings.first_name(self.served_model_name) or self.model
                                   or model_files.BUNDLED_MODEL_NAME),
                tokenizer_dir=tokenizer_dir,
                dtype_is_auto=isinstance(self.dtype, str) and self.dtype == "auto",
                tokenizer_mode=self.tokenizer_mode, trust_remote_code=self.trust_remote_code),
            cache=CacheConfig(
                block_size=platform.default_block_size if self.block_size is None else self.block_size,
                block_size_explicit=self.block_size is not None, enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_space=self.kv_cache_space if self.kv_cache_space is not None else env.cpu_kvcache_space_gib,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max_batched,
                enable_chunked_prefill=self.enable_chunked_prefill, max_model_len=max_model_len,
                policy=self.scheduling_policy, max_loras=lora.max_loras if lora else 0),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                    distributed_executor_backend=self._executor_backend()),
            platform=platform, quantization=quantization, enforce_eager=self.enforce_eager,
            compilation=CompilationConfig.parse(self._compilation_settings(), self.enforce_eager, self.max_num_seqs,
                                                self.max_seq_len_to_capture),
            env=env, extra=extra, lora=lora, structured_outputs=structured_outputs,
        )
        platform.check_and_update_config(config)
        if self.kv_cache_memory_bytes is not None:
            config.cache.num_gpu_blocks_override = model_settings.kv_blocks_in(self.kv_cache_memory_bytes, config)
        if self.log_level is not None:
            logging.getLogger("plexus").setLevel(self.log_level.upper())
        return config

    def _generation_config(self, model_dir: Path) -> dict:
        """vLLM's generation_config: "auto", the model's generation_config.json; "vllm", none; else a directory
        holding one."""
        if self.generation_config == "vllm":
            return {}
        directory = model_dir if self.generation_config == "auto" else Path(self.generation_config).expanduser()
        if self.generation_config != "auto" and not (directory / "generation_config.json").is_file():
            raise ValueError(f"generation_config={self.generation_config!r}: expected 'auto', 'vllm' or a directory "
                             "holding generation_config.json")
        return model_files.load_generation_config(directory)

    def _compilation_settings(self) -> Any:
        """compilation_config with the top-level cudagraph_capture_sizes / max_cudagraph_capture_size (vLLM's
        shorthands for its keys) merged in; the same key set twice to different values is an error."""
        value = self.compilation_config
        shorthands = {key: getattr(self, key) for key in ("cudagraph_capture_sizes", "max_cudagraph_capture_size")
                      if getattr(self, key) is not None}
        if not shorthands:
            return value
        value = {"level": value} if isinstance(value, int) and not isinstance(value, bool) else dict(value or {})
        for key, setting in shorthands.items():
            if value.get(key, setting) != setting:
                raise ValueError(f"{key}={setting!r} differs from compilation_config's {key}={value[key]!r}; "
                                 "set one of them")
            value[key] = setting
        return value

    def _runs_gguf_natively(self, platform, env) -> bool:
        """quantization and dtype unset, a GGUF file (the bundled model by default) whose linear weights are all
        Q8_0 / Q4_0 / Q4_1, and a platform on which they decode faster as stored than dequantized."""
        if self.quantization is not None or self.dtype != "auto" or self.load_format not in ("auto", "gguf"):
            return False
        if self.model is None:
            path = model_files.bundled_gguf_path()
        elif str(self.model).endswith(".gguf") and Path(self.model).is_file():
            path = Path(self.model)
        else:
            return False
        return "gguf" in platform.supported_quantizations and platform.runs_gguf_natively(env) and \
            model_files.runs_natively_by_default(path)

    def _lora_config(self, platform) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        if not platform.supports_lora:
            raise ValueError(f"enable_lora=True: the {platform.name} platform does not serve LoRA adapters; "
                             "the cpu platform does")
        if self.tensor_parallel_size > 1:
            raise ValueError("enable_lora=True with tensor_parallel_size > 1 is not supported yet: LoRA weights are "
                             "not sharded across ranks")
        dtype = self.lora_dtype      # "auto": the model's dtype, once the platform has settled it
        if not isinstance(dtype, torch.dtype):
            dtype = None if dtype == "auto" else DTYPES[dtype]
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          max_cpu_loras=self.max_cpu_loras or self.max_loras, lora_dtype=dtype)

    def _quantization(self, hf_config: PretrainedConfig) -> str | None:
        """The user's quantization=, else the method the checkpoint's quantization_config names."""
        from_checkpoint = quantization_method(hf_config)
        if self.quantization is not None and from_checkpoint is not None and self.quantization != from_checkpoint:
            raise ValueError(f"quantization={self.quantization!r} does not match the checkpoint, which is quantized "
                             f"with {from_checkpoint!r} (config.json quantization_config); leave quantization unset")
        return self.quantization or from_checkpoint

    def _check_load_format(self, model_dir: Path, hf_config: PretrainedConfig) -> None:
        is_gguf = self.model is not None and str(self.model).endswith(".gguf") or self.model is None
        if self.load_format == "gguf" and not is_gguf:
            raise ValueError(f"load_format='gguf' but model={self.model!r} is not a .gguf file")
        if self.load_format == "safetensors" and is_gguf:
            raise ValueError(f"load_format='safetensors' but model={self.model!r} is a GGUF file; "
                             "use load_format='auto' or 'gguf'")
        # As in vLLM: the bitsandbytes loader goes with bitsandbytes quantization (the user's, or the
        # checkpoint's), which in turn needs no load_format (auto reads the same tensors).
        quantization = self.quantization or quantization_method(hf_config)
        if self.load_format == "bitsandbytes" and quantization != "bitsandbytes":
            raise ValueError(f"load_format='bitsandbytes' loads with quantization='bitsandbytes', but quantization "
                             f"is {quantization!r}; set quantization='bitsandbytes' or leave load_format='auto'")

    # Settings vLLM has that plexus does not act on: refused when set to anything but their default, since a
    # setting accepted and ignored would be a silent lie. {setting: Unsupported(why, default, ...)}
    _UNSUPPORTED = UNSUPPORTED

    def _refuse_unsupported(self) -> None:
        for name, setting in self._UNSUPPORTED.items():
            value = getattr(self, name)
            if not setting.accepts(value):
                also = "".join(f" or {v!r}" for v in setting.also)
                raise ValueError(f"{name}={value!r} is not supported: {setting.why}; leave it at its default "
                                 f"({setting.default!r}{also})")
        if self.tokenizer_mode not in ("auto", "slow"):
            raise ValueError(f"tokenizer_mode={self.tokenizer_mode!r} is not supported; allowed: auto, slow")

    def _executor_backend(self) -> str:
        backend = self.distributed_executor_backend
        if backend is None:
            return "uni" if self.tensor_parallel_size == 1 else "mp"
        if backend == "ray":
            raise ValueError('distributed_executor_backend="ray" is not supported yet (multi-node parallelism on '
                             'Ray is the next executor); allowed: "uni", "mp"')
        if backend not in ("uni", "mp"):
            raise ValueError(f"distributed_executor_backend={backend!r} is not supported; allowed: "
                             '"uni" (the worker in this process), "mp" (one worker process per rank)')
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(f'distributed_executor_backend="uni" runs one worker, but tensor_parallel_size='
                             f'{self.tensor_parallel_size} needs one per rank; use "mp"')
        return backend

    def _check_ranges(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.block_size is None or isinstance(self.block_size, int) and self.block_size >= 1,
             f"block_size must be a positive integer, got {self.block_size!r}")
        need(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
             f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        need(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be a positive integer, got {self.max_num_batched_tokens!r}")
        need(self.max_model_len is None or self.max_model_len >= 1,
             f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        need(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
             f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        need(0 < self.gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        need(self.kv_cache_space is None or self.kv_cache_space > 0,
             f"kv_cache_space must be a positive number of GiB, got {self.kv_cache_space!r}")
        need(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
             f"num_gpu_blocks_override must be a positive integer, got {self.num_gpu_blocks_override!r}")
        need(isinstance(self.max_logprobs, int) and self.max_logprobs >= -1,
             f"max_logprobs must be a non-negative integer or -1 (no limit), got {self.max_logprobs!r}")
        need(self.scheduling_policy in ("fcfs", "priority"),
             f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        need(isinstance(self.max_seq_len_to_capture, int) and self.max_seq_len_to_capture >= 1,
             f"max_seq_len_to_capture must be a positive integer, got {self.max_seq_len_to_capture!r}")
        need(self.load_format in ("auto", "safetensors", "gguf", "bitsandbytes"),
             f"load_format must be one of auto, safetensors, gguf, bitsandbytes; got {self.load_format!r}")
        need(isinstance(self.generation_config, str) and self.generation_config != "",
             f"generation_config must be 'auto', 'vllm' or a directory, got {self.generation_config!r}")
        need(self.kv_cache_memory_bytes is None or self.num_gpu_blocks_override is None,
             "kv_cache_memory_bytes and num_gpu_blocks_override both size the KV cache; set one of them")
        need(self.kv_cache_memory_bytes is None or isinstance(self.kv_cache_memory_bytes, int)
             and self.kv_cache_memory_bytes > 0,
             f"kv_cache_memory_bytes must be a positive integer, got {self.kv_cache_memory_bytes!r}")
        need(self.log_level is None or str(self.log_level).lower() in ("debug", "info", "warning", "error",
                                                                         "critical"),
             f"log_level must be debug, info, warning, error or critical; got {self.log_level!r}")
        need(self.hf_token is None or isinstance(self.hf_token, (bool, str)),
             f"hf_token must be True, False or a token string, got {type(self.hf_token).__name__}")
        need(isinstance(self.max_loras, int) and self.max_loras >= 1,
             f"max_loras must be a positive integer, got {self.max_loras!r}")
        need(self.max_lora_rank in LORA_RANKS,
             f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}; got {self.max_lora_rank!r}")
        need(self.max_cpu_loras is None or isinstance(self.max_cpu_loras, int) and self.max_cpu_loras >= self.max_loras,
             f"max_cpu_loras ({self.max_cpu_loras!r}) must be at least max_loras ({self.max_loras!r})")
        need(isinstance(self.lora_dtype, torch.dtype) or self.lora_dtype == "auto" or self.lora_dtype in DTYPES,
             f"lora_dtype must be 'auto', 'float32', 'bfloat16' or 'float16'; got {self.lora_dtype!r}")
        need(isinstance(self.dtype, (str, torch.dtype)), f"dtype must be a string such as 'auto' or 'bfloat16', got {self.dtype!r}")


def _qlora_target_modules(path: str, hub: model_files.HubOptions) -> list[str]:
    """The module kinds a QLoRA adapter was trained on (its adapter_config.json target_modules): what vLLM's
    bitsandbytes loader quantizes when qlora_adapter_name_or_path is set."""
    import json

    from plexus.core.lora.adapter import ADAPTER_FILES

    local = Path(path).expanduser()
    try:
        directory = local if local.is_dir() else model_files.from_hub("QLoRA adapter", path, hub, None, ADAPTER_FILES)
    except ValueError as error:
        raise ValueError(f"qlora_adapter_name_or_path={path!r}: {error}") from None
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"qlora_adapter_name_or_path={path!r}: could not read adapter_config.json: {error}") from None
    targets = config.get("target_modules") if isinstance(config, dict) else None
    if isinstance(targets, str):
        targets = [targets] if targets != "all-linear" else []
    if not isinstance(targets, list):
        raise ValueError(f"qlora_adapter_name_or_path={path!r}: adapter_config.json has no target_modules list")
    return [str(t).rpartition(".")[2] for t in targets]


@dataclass
class AsyncEngineArgs(EngineArgs):
    """vLLM's arguments of the async engine: the same settings (the server adds its own)."""
