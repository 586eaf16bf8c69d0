"""Settings are honoured or refused, never silently ignored; environment variables are read once, when the
engine is built, and a bad value names the variable and what is allowed."""
from __future__ import annotations

import dataclasses

import pytest

from plexus import LLM, EngineArgs, SamplingParams
from plexus.envs import VARIABLES, Environment


@pytest.mark.parametrize("name, value, reason", [
    ("swap_space", 8, "never swaps KV blocks"),
    ("cpu_offload_gb", 2, "weight offloading is not supported"),
    ("scheduling_policy", "lifo", "must be 'fcfs' or 'priority'"),
    ("enable_lora_bias", True, "bias on lora_B"),
    ("fully_sharded_loras", True, "not sharded across tensor-parallel ranks"),
    ("qlora_adapter_name_or_path", "some/adapter", "needs quantization='bitsandbytes'"),
    ("pipeline_parallel_size", 2, "pipeline parallelism is not supported"),
    ("tokenizer_mode", "mistral", "allowed: auto, slow"),
    ("override_neuron_config", {"cast_logits_dtype": "bfloat16"}, "applies to device='neuron' only"),
    ("load_format", "safetensors", "is a GGUF file"),
    ("max_seq_len_to_capture", 0, "must be a positive integer"),
])
def test_settings_plexus_does_not_act_on_are_refused_with_their_name(name, value, reason):
    with pytest.raises(ValueError, match=f"{name}.*{reason}"):
        EngineArgs(**{name: value}).create_engine_config()


def test_every_engine_args_field_is_honoured_or_refused():
    """The list of fields this file and the engine account for: a new field must be added to one of them."""
    refused = set(EngineArgs._UNSUPPORTED) | {"tokenizer_mode", "override_neuron_config", "load_format"}
    assert not refused & {"revision", "tokenizer_revision", "download_dir"}   # hub ids resolve (test_hub.py)
    honoured = {
        "model", "tokenizer", "skip_tokenizer_init", "trust_remote_code", "dtype", "seed", "max_model_len",
        "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching", "enable_chunked_prefill",
        "device", "quantization", "tensor_parallel_size", "kv_cache_space", "gpu_memory_utilization",
        "num_gpu_blocks_override", "enforce_eager", "compilation_config", "max_seq_len_to_capture",
        "disable_log_stats", "max_logprobs", "served_model_name", "generation_config",
        "disable_custom_all_reduce", "revision", "tokenizer_revision", "download_dir", "scheduling_policy",
        # LoRA (test_lora.py, test_lora_errors.py)
        "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_dtype", "qlora_adapter_name_or_path",
        # structured outputs (test_structured_outputs.py)
        "structured_outputs_config", "guided_decoding_backend",
        # vLLM's newer settings (test_vllm_engine_args.py)
        "hf_token", "hf_overrides", "override_generation_config", "cudagraph_capture_sizes",
        "max_cudagraph_capture_size", "kv_cache_memory_bytes", "log_level",
        "distributed_executor_backend",
        # model families (test_model_families.py)
        "disable_sliding_window",
    }
    assert {f.name for f in dataclasses.fields(EngineArgs)} == refused | honoured


def test_gpu_memory_utilization_bounds_the_cpu_kv_cache(monkeypatch):
    from plexus.platforms import host

    monkeypatch.setattr(host, "available_memory_bytes", lambda: 1 << 30)
    small = EngineArgs(gpu_memory_utilization=0.25).create_engine_config()
    assert host.kv_cache_budget_bytes(small.cache) == (1 << 30) // 8
    assert host.kv_cache_budget_bytes(EngineArgs().create_engine_config().cache) == int((1 << 30) * 0.9 / 2)


def test_max_seq_len_to_capture_sends_longer_sequences_to_the_eager_path():
    import torch

    from plexus.models.layers.attention import AttentionMetadata
    from plexus.models.llama import LlamaForCausalLM
    from plexus.worker.compiled_decode import CompiledDecode

    config = EngineArgs(dtype="float32", max_seq_len_to_capture=32, max_num_seqs=4,
                        compilation_config={"level": 3, "cudagraph_capture_sizes": [2, 4]}).create_engine_config()
    assert config.compilation.max_seq_len_to_capture == 32
    # (the class stands for a model: what the graphs ask of it is its declared decode_recipe)
    compiled = CompiledDecode(LlamaForCausalLM, [], config.compilation.cudagraph_capture_sizes, max_blocks=64,
                              scratch_block=0, block_size=16, max_seq_len=config.compilation.max_seq_len_to_capture)

    def decode_step(seq_lens):
        return AttentionMetadata.build([1] * len(seq_lens), seq_lens, [[0, 1, 2]] * len(seq_lens), 16,
                                       torch.device("cpu"), use_decode_kernel=True)

    assert compiled.bucket_for(decode_step([5, 32, 20])) == 4     # every sequence within 32 tokens: a graph
    assert compiled.bucket_for(decode_step([5, 33])) is None      # one longer: the eager path


def test_environment_is_read_once_when_the_engine_is_built(monkeypatch, tmp_path):
    monkeypatch.setenv("PLEXUS_FUSED_DECODE", "0")
    config = EngineArgs(dtype="float32").create_engine_config()
    monkeypatch.setenv("PLEXUS_FUSED_DECODE", "1")       # later changes do not reach a built config
    assert config.env.fused_decode is False and set(VARIABLES) >= {"PLEXUS_CACHE_DIR", "NEURON_QUANT_DTYPE"}
    assert Environment.read({"PLEXUS_CACHE_DIR": str(tmp_path)}).cache_dir == tmp_path


@pytest.mark.parametrize("variable", ["PLEXUS_CPU_KERNELS", "PLEXUS_FUSED_DECODE"])
def test_a_bad_switch_names_the_variable_and_the_allowed_values(monkeypatch, variable):
    monkeypatch.setenv(variable, "maybe")
    with pytest.raises(ValueError, match=f"{variable}='maybe' is not a switch; allowed: 1, 0"):
        LLM(dtype="float32")


def test_disable_log_stats_false_logs_throughput(llm_fp32, monkeypatch):
    import logging

    from plexus.core.metrics import LoggingStatLogger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("plexus")
    logger.addHandler(handler)
    engine = llm_fp32.llm_engine
    monkeypatch.setattr(engine, "stat_loggers", [LoggingStatLogger(interval=0.0)])
    try:
        llm_fp32.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        logger.removeHandler(handler)
    assert any("Avg generation throughput" in r.getMessage() and "KV cache usage" in r.getMessage()
               for r in records)
