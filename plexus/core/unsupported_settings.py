"""vLLM's engine settings that plexus does not act on, each with why and what plexus does instead.

Every one is an EngineArgs field (and a `plexus serve` flag) at vLLM's default, so a vLLM script that passes it
runs unchanged; any other value is refused by EngineArgs with the reason below, since a setting accepted and
ignored would be a silent lie. `also` lists values that describe what plexus always does, accepted for that
reason. The names come from vLLM's own EngineArgs (tests/data/vllm_engine_args.json, checked by
tests/test_vllm_engine_args.py); a few older vLLM names plexus kept are here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Unsupported:
    why: str
    default: Any = None
    type: str = "str | None"     # the annotation, as the CLI reads it (EngineArgs.add_cli_args)
    also: tuple = ()             # other values accepted: they are what plexus does anyway

    def accepts(self, value: Any) -> bool:
        """Unset (None, an empty collection), the default, or a value in `also`."""
        if value is None or (isinstance(value, (dict, list, tuple, set)) and not value):
            return True
        return any(_same(value, ok) for ok in (self.default, *self.also))


def _same(value: Any, ok: Any) -> bool:
    if isinstance(value, bool) or isinstance(ok, bool):     # True is not 1 here: a flag is a flag
        return isinstance(value, bool) and isinstance(ok, bool) and value == ok
    return ok is not None and value == ok


# Why, shared by families of settings.
_MM = "plexus serves text-only models; multimodal inputs (images, audio, video) and their encoders are not supported"
_SPEC = "speculative decoding is not implemented yet (issue 28 adds n-gram, suffix, draft-model and EAGLE)"
_PAR = ("plexus runs one rank; tensor, pipeline, data, context and expert parallelism and multi-node runs are "
        "not implemented yet (issue 30)")
_POOL = "pooling models (embeddings, classification, scoring, reward) are not supported yet; plexus generates text"
_KV_DTYPE = "the KV cache is stored in the model's dtype; quantized KV caches (fp8) are not supported yet"
_REASON = "reasoning parsers are not supported yet (issue 32 adds --reasoning-parser)"
_KERNEL = ("a choice among vLLM's CUDA kernel backends; plexus's platform picks its own kernels (Triton on CUDA, "
           "C++ on CPU)")
_MAMBA = "plexus runs no Mamba or hybrid state-space models, so there is no Mamba state to configure"
_OFFLOAD = "plexus keeps every weight and KV block on its device; offloading to host memory is not supported"
_OBS = ("plexus reports Prometheus metrics at the server's /metrics and logs stats; this tracing or metric is "
        "not supported")
_SLEEP = "sleep mode (releasing GPU memory while idle, through CUDA's cumem allocator) is not supported"
_DISAGG = "disaggregated prefill and KV or encoder-cache transfer between engines are not supported"
_LOAD = "plexus loads safetensors and GGUF checkpoints with its own loader; this loading option is not supported"
_SCHED = "plexus's scheduler is vLLM's default policy (fcfs or priority, chunked prefill); this knob is not supported"

UNSUPPORTED: dict[str, Unsupported] = {
    # The model and its loading
    "enable_return_routed_experts": Unsupported("returning MoE routing decisions is not supported", False, "bool"),
    "return_sampling_mask": Unsupported("returning the sampling mask is not supported", False, "bool"),
    "model_weights": Unsupported("weights come from `model` itself; a separate weights path is not supported", "",
                                 "str"),
    "hf_config_path": Unsupported("config.json is read from the model directory; a separate config path is not "
                                  "supported"),
    "runner": Unsupported(_POOL, "auto", "str", also=("generate",)),
    "convert": Unsupported(_POOL, "auto", "str", also=("none",)),
    "enable_prompt_embeds": Unsupported("prompts are token ids or text; prompt embeddings are not supported", False,
                                        "bool"),
    "allowed_local_media_path": Unsupported(_MM, "", "str"),
    "allowed_media_domains": Unsupported(_MM, None, "list[str] | None"),
    "safetensors_load_strategy": Unsupported(_LOAD),
    "safetensors_prefetch_num_threads": Unsupported(_LOAD, None, "int | None"),
    "safetensors_prefetch_block_size": Unsupported(_LOAD, None, "int | None"),
    "config_format": Unsupported("plexus reads Hugging Face config.json (or GGUF metadata); Mistral's params.json "
                                 "format is not supported", "auto", "str", also=("hf",)),
    "code_revision": Unsupported("remote code, when trust_remote_code=True, is read at the model's own revision; "
                                 "a separate code revision is not supported"),
    "model_class_overrides": Unsupported("the architecture comes from config.json through plexus's model registry; "
                                         "overriding the model class is not supported", None, "dict | None"),
    "quantization_config": Unsupported("online quantization settings are not supported: pass quantization= "
                                       "(int8, fp8, bitsandbytes, ...) or a quantized checkpoint, or make one "
                                       "with `plexus quantize`", None, "dict | None"),
    # A permission: plexus has no deprecated quantization methods to forbid.
    "allow_deprecated_quantization": Unsupported("a permission: plexus has no deprecated quantization methods",
                                                 False, "bool", also=(True,)),
    "model_impl": Unsupported("plexus runs its own model implementations (vLLM's 'vllm'); the Transformers and "
                              "other backends are not supported", "auto", "str", also=("vllm",)),
    "model_loader_extra_config": Unsupported(_LOAD, None, "dict | None"),
    "ignore_patterns": Unsupported("plexus downloads only config, tokenizer and safetensors files; other "
                                   "ignore patterns are not supported", None, "list[str] | None"),
    "pt_load_map_location": Unsupported("PyTorch .bin/.pt checkpoints are not loaded (safetensors and GGUF are)",
                                        "cpu", "str"),
    "use_tqdm_on_load": Unsupported("plexus shows no progress bar while loading weights", True, "bool",
                                    also=(False,)),
    "disable_cascade_attn": Unsupported("plexus has no cascade attention: True (disabled) is what it does", None,
                                        "bool | None", also=(True,)),
    "pooler_config": Unsupported(_POOL, None, "dict | None"),
    "override_pooler_config": Unsupported(_POOL, None, "dict | None"),
    "logits_processors": Unsupported("engine-wide LogitsProcessor classes (vLLM v1's batch-level interface) are "
                                     "not supported; pass per-request callables in "
                                     "SamplingParams(logits_processors=[...]) instead", None, "list[str] | None"),
    "logits_processor_pattern": Unsupported("logits processors named by module path are not loaded; pass "
                                            "callables in SamplingParams(logits_processors=[...]) instead"),
    "logprobs_mode": Unsupported("logprobs are those of the raw model output (raw_logprobs); processed or logit "
                                 "modes are not supported", "raw_logprobs", "str"),
    "use_fp64_gumbel": Unsupported("sampling draws in float32; float64 Gumbel noise is not supported", False, "bool"),
    "enable_trace_replay": Unsupported("trace replay is not supported", False, "bool"),
    "tokens_only": Unsupported("the tokens-only engine mode is not supported; skip_tokenizer_init=True serves token "
                               "ids without a tokenizer", False, "bool"),
    "language_model_only": Unsupported("plexus serves the language model only (True) in any case", False, "bool",
                                       also=(True,)),
    "io_processor_plugin": Unsupported(_POOL),
    "renderer_num_workers": Unsupported("prompts are tokenized in the engine's own thread", 1, "int"),
    # Multimodal
    **{name: Unsupported(_MM, default, kind) for name, default, kind in (
        ("limit_mm_per_prompt", None, "dict | None"), ("enable_mm_embeds", False, "bool"),
        ("interleave_mm_strings", False, "bool"), ("media_io_kwargs", None, "dict | None"),
        ("mm_processor_kwargs", None, "dict | None"), ("mm_processor_cache_gb", 4, "float"),
        ("mm_processor_cache_type", "lru", "str"), ("mm_hasher_algorithm", "blake3", "str"),
        ("mm_shm_cache_max_object_size_mb", 128, "int"), ("mm_encoder_only", False, "bool"),
        ("mm_encoder_tp_mode", "weights", "str"), ("mm_encoder_attn_backend", None, "str | None"),
        ("mm_encoder_attn_dtype", None, "str | None"), ("mm_encoder_fp8_scale_path", None, "str | None"),
        ("mm_encoder_fp8_scale_save_path", None, "str | None"), ("mm_encoder_fp8_scale_save_margin", 1.5, "float"),
        ("skip_mm_profiling", False, "bool"), ("video_pruning_rate", None, "float | None"),
        ("video_pruning_method", "evs", "str"), ("mm_tensor_ipc", "direct_rpc", "str"),
        ("mm_processor_device", "auto", "str"), ("mm_ipc_gpu_memory_gb", 0, "float"),
        ("mm_device_do_normalize", True, "bool"), ("disable_chunked_mm_input", False, "bool"),
        ("default_mm_loras", None, "dict | None"), ("enable_tower_connector_lora", False, "bool"),
        ("enable_mm_processor_stats", False, "bool"))},
    # KV cache
    "kv_cache_dtype": Unsupported(_KV_DTYPE, "auto", "str"),
    "kv_cache_dtype_skip_layers": Unsupported(_KV_DTYPE, None, "list[str] | None"),
    "prefix_caching_hash_algo": Unsupported("prefix-cache blocks are keyed by plexus's own hash of their tokens "
                                            "and prefix", "sha256", "str"),
    "prefix_cache_retention_interval": Unsupported("cached blocks stay until evicted (LRU); a retention interval "
                                                   "is not supported", 0, "int | None"),
    "prefix_match_unit": Unsupported("prefixes are matched in whole blocks of block_size tokens", None,
                                     "int | None"),
    "kv_sharing_fast_prefill": Unsupported("KV sharing across layers is not supported", False, "bool"),
    "swa_bounded_replay": Unsupported("plexus has no sliding-window KV manager to bound", True, "bool"),
    "kv_offloading_size": Unsupported(_OFFLOAD, None, "float | None"),
    "kv_offloading_backend": Unsupported(_OFFLOAD, "native", "str"),
    "swap_space": Unsupported("plexus preempts by recomputing and never swaps KV blocks to host memory", 4, "float"),
    "kv_transfer_config": Unsupported(_DISAGG, None, "dict | None"),
    "kv_events_config": Unsupported("KV cache events are not published", None, "dict | None"),
    "ec_transfer_config": Unsupported(_DISAGG, None, "dict | None"),
    "ec_manager_config": Unsupported(_MM, None, "dict | None"),
    # Offloading weights
    "offload_backend": Unsupported(_OFFLOAD, "auto", "str"),
    "cpu_offload_gb": Unsupported("plexus keeps every weight on the device; weight offloading is not supported", 0,
                                  "float"),
    "cpu_offload_params": Unsupported(_OFFLOAD, None, "list[str] | None"),
    "offload_group_size": Unsupported(_OFFLOAD, 0, "int"),
    "offload_num_in_group": Unsupported(_OFFLOAD, 1, "int"),
    "offload_prefetch_step": Unsupported(_OFFLOAD, 1, "int"),
    "offload_params": Unsupported(_OFFLOAD, None, "list[str] | None"),
    # Parallelism (tensor_parallel_size and distributed_executor_backend are EngineArgs' own)
    **{name: Unsupported(_PAR, default, kind) for name, default, kind in (
        ("master_addr", "127.0.0.1", "str"), ("master_port", 29501, "int"),
        ("nnodes", 1, "int"), ("node_rank", 0, "int"), ("distributed_timeout_seconds", None, "int | None"),
        ("cpu_distributed_timeout_seconds", None, "int | None"), ("device_ids", None, "list[str] | None"),
        ("prefill_context_parallel_size", 1, "int"), ("decode_context_parallel_size", 1, "int"),
        ("dcp_comm_backend", None, "str | None"), ("dcp_q_replicate", None, "bool | None"),
        ("dcp_kv_cache_interleave_size", 1, "int"), ("cp_kv_cache_interleave_size", None, "int | None"),
        ("data_parallel_size", 1, "int"), ("data_parallel_rank", None, "int | None"),
        ("data_parallel_start_rank", None, "int | None"), ("data_parallel_size_local", None, "int | None"),
        ("data_parallel_address", None, "str | None"), ("data_parallel_rpc_port", None, "int | None"),
        ("data_parallel_hybrid_lb", False, "bool"), ("data_parallel_external_lb", False, "bool"),
        ("data_parallel_multi_port_external_lb", False, "bool"), ("data_parallel_backend", "mp", "str"),
        ("enable_hc_sp", False, "bool"), ("enable_expert_parallel", False, "bool"),
        ("enable_batch_sharded_sampling", None, "bool | None"), ("enable_ep_weight_filter", False, "bool"),
        ("all2all_backend", "allgather_reducescatter", "str"), ("enable_elastic_ep", False, "bool"),
        ("elastic_ep_max_dp_size", None, "int | None"), ("enable_dbo", False, "bool"), ("ubatch_size", 0, "int"),
        ("dbo_decode_token_threshold", 32, "int"), ("dp_sync_interval", 16, "int"),
        ("dbo_prefill_token_threshold", 512, "int"), ("disable_nccl_for_dp_synchronization", None, "bool | None"),
        ("eplb_config", None, "dict | None"), ("enable_eplb", False, "bool"),
        ("expert_placement_strategy", "linear", "str"), ("_api_process_count", 1, "int"),
        ("_api_process_rank", 0, "int"), ("max_parallel_loading_workers", None, "int | None"),
        ("ray_workers_use_nsight", False, "bool"), ("worker_cls", "auto", "str"), ("worker_extension_cls", "", "str"),
        ("enable_shm_tensor_arena", False, "bool"),
        ("numa_bind", False, "bool"), ("numa_bind_nodes", None, "list[int] | None"),
        ("numa_bind_cpus", None, "list[str] | None"), ("fault_tolerance_config", None, "dict | None"),
        ("enable_fault_tolerance", False, "bool"), ("weight_transfer_config", None, "dict | None"))},
    "pipeline_parallel_size": Unsupported("pipeline parallelism is not supported yet (issue 30)", 1, "int"),
    "fully_sharded_loras": Unsupported("LoRA weights are not sharded across tensor-parallel ranks", False, "bool"),
    # Kernels and compilation (GPU-specific backends of vLLM's)
    **{name: Unsupported(_KERNEL, default, kind) for name, default, kind in (
        ("ir_op_priority", None, "dict | None"), ("moe_backend", "auto", "str"), ("linear_backend", "auto", "str"),
        ("sparse_indexer_topk_backend", "auto", "str"), ("attention_backend", None, "str | None"),
        ("attention_config", None, "dict | None"), ("kernel_config", None, "dict | None"),
        ("enable_flashinfer_autotune", None, "bool | None"), ("gdn_prefill_backend", None, "str | None"),
        ("kda_prefill_backend", None, "str | None"), ("kda_decode_backend", None, "str | None"))},
    "optimization_level": Unsupported("plexus's optimization switches are enforce_eager and compilation_config "
                                      "(level 3: compiled decode graphs)", 2, "int"),
    "performance_mode": Unsupported("plexus's optimization switches are enforce_eager and compilation_config",
                                    "balanced", "str"),
    "engram_config": Unsupported("Engram memory layers are not supported", None, "dict | None"),
    "aux_output_config": Unsupported("auxiliary model outputs are not supported", None, "dict | None"),
    "diffusion_config": Unsupported("diffusion language models are not supported", None, "dict | None"),
    "watermark_config": Unsupported("output watermarking is not supported", None, "dict | None"),
    "additional_config": Unsupported("platform-specific extra settings are not read; the Neuron platform takes "
                                     "override_neuron_config", None, "dict | None"),
    # Mamba / hybrid models
    **{name: Unsupported(_MAMBA, default, kind) for name, default, kind in (
        ("mamba_config", None, "dict | None"), ("mamba_cache_dtype", "auto", "str"),
        ("mamba_ssm_cache_dtype", "auto", "str"), ("mamba_block_size", None, "int | None"),
        ("mamba_cache_mode", "none", "str"), ("enable_mamba_shared_prefix_checkpoint", False, "bool"),
        ("replayssm_buffer_len", 16, "int"), ("use_replayssm", False, "bool"), ("mamba_backend", "triton", "str"),
        ("mamba_ssu_algorithm", None, "str | None"), ("enable_mamba_cache_stochastic_rounding", False, "bool"),
        ("mamba_cache_philox_rounds", 0, "int"))},
    "disable_hybrid_kv_cache_manager": Unsupported("plexus has one KV cache manager: True (no hybrid one) is what "
                                                   "it does", None, "bool | None", also=(True,)),
    # Scheduling
    "max_num_scheduled_tokens": Unsupported(_SCHED + "; max_num_batched_tokens caps a step's tokens", None,
                                            "int | None"),
    "long_prefill_token_threshold": Unsupported(_SCHED, 0, "int"),
    "long_prefill_token_threshold_adaptive": Unsupported(_SCHED, False, "bool"),
    "max_num_active_seqs": Unsupported(_SCHED + "; max_num_seqs caps the running requests", None, "int | None"),
    "max_num_queued_reqs": Unsupported(_SCHED + "; waiting requests are not capped", None, "int | None"),
    "max_num_queued_tokens": Unsupported(_SCHED + "; waiting requests are not capped", None, "int | None"),
    "scheduler_reserve_full_isl": Unsupported(_SCHED, True, "bool"),
    "prefill_schedule_interval": Unsupported(_SCHED, 1, "int"),
    "watermark": Unsupported(_SCHED, 0.0, "float"),
    "scheduler_cls": Unsupported("plexus has one scheduler (core/scheduler.py); custom scheduler classes are not "
                                 "loaded"),
    "async_scheduling": Unsupported("plexus schedules each step after the previous one's output (False); "
                                    "asynchronous scheduling is not supported", None, "bool | None", also=(False,)),
    "stream_interval": Unsupported("streamed outputs carry every new token as it is made (interval 1)", 1, "int"),
    # Speculative decoding, reasoning
    "speculative_config": Unsupported(_SPEC, None, "dict | None"),
    "spec_method": Unsupported(_SPEC),
    "spec_model": Unsupported(_SPEC),
    "spec_tokens": Unsupported(_SPEC, None, "int | None"),
    "reasoning_parser": Unsupported(_REASON, "", "str"),
    "reasoning_parser_plugin": Unsupported(_REASON),
    "reasoning_config": Unsupported(_REASON, None, "dict | None"),
    # LoRA
    "lora_target_modules": Unsupported("an adapter applies to every module its adapter_config.json targets; "
                                       "restricting them is not supported", None, "list[str] | None"),
    "specialize_active_lora": Unsupported("LoRA kernels are not specialized per adapter count", False, "bool"),
    "enable_mixed_moe_lora_format": Unsupported("LoRA on MoE experts is not supported", False, "bool"),
    "enable_moe_shared_loras": Unsupported("LoRA on MoE experts is not supported", False, "bool"),
    "max_lora_cls_labels": Unsupported(_POOL, None, "int | None"),
    "enable_lora_bias": Unsupported("LoRA adapters with a bias on lora_B (PEFT's lora_bias) are not supported",
                                    False, "bool"),
    # Sleep mode and GPU memory
    "enable_sleep_mode": Unsupported(_SLEEP, False, "bool"),
    "sleep_mode_offload_cudagraph": Unsupported(_SLEEP, False, "bool"),
    "sleep_preserve_parameter_names": Unsupported(_SLEEP, None, "list[str] | None"),
    "enable_cumem_allocator": Unsupported(_SLEEP, False, "bool"),
    "enable_nccl_comm_suspend": Unsupported(_SLEEP, False, "bool"),
    # Observability and process control
    **{name: Unsupported(_OBS, default, kind) for name, default, kind in (
        ("show_hidden_metrics_for_version", None, "str | None"), ("otlp_traces_endpoint", None, "str | None"),
        ("collect_detailed_traces", None, "list[str] | None"), ("per_request_spec_decode_metrics", "none", "str"),
        ("kv_cache_metrics", False, "bool"), ("kv_cache_metrics_sample", 0.01, "float"),
        ("custom_histogram_buckets", None, "dict | None"), ("cudagraph_metrics", False, "bool"),
        ("enable_layerwise_nvtx_tracing", False, "bool"), ("enable_mfu_metrics", False, "bool"),
        ("enable_logging_iteration_details", False, "bool"), ("jit_monitor_mode", "warn", "str"),
        ("jit_monitor_verbose", False, "bool"), ("aggregate_engine_logging", False, "bool"),
        ("profiler_config", None, "dict | None"))},
    "logging_config": Unsupported("logging is configured through Python's logging module (logger 'plexus'); "
                                  "set log_level for its level", None, "dict | None"),
    "log_config_file": Unsupported("logging is configured through Python's logging module (logger 'plexus'); "
                                   "set log_level for its level"),
    "shutdown_timeout": Unsupported("the server stops when its requests are aborted; a drain timeout is not "
                                    "supported", 0, "int"),
    "fail_on_environ_validation": Unsupported("unknown VLLM_* / PLEXUS_* variables are not validated", False,
                                              "bool"),
}
