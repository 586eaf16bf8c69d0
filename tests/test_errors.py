"""Bad input gets a clear error that names the setting, and the engine keeps
serving everyone else."""
from __future__ import annotations

import json

import pytest

from plexus import LLM, SamplingParams

OK = SamplingParams(temperature=0, max_tokens=4)


def _still_serves(llm: LLM) -> None:
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate("Hello", OK, use_tqdm=False)[0]
    assert out.finished and len(out.outputs[0].token_ids) > 0


@pytest.mark.parametrize("prompt, message", [
    ("", "Prompt cannot be empty"),
    ({"prompt_token_ids": []}, "Prompt cannot be empty"),
    ({"prompt_token_ids": [1, 2, 10 ** 9]},
     r"Token id 1000000000 is out of vocabulary: prompt_token_ids must be in \[0, 49152\)"),
    ("word " * 1100, r"max_model_len=1024"),
    (42, "prompt must be a string"),
])
def test_bad_prompt_is_refused_and_the_engine_keeps_serving(llm_fp32, prompt, message):
    with pytest.raises((ValueError, TypeError), match=message):
        llm_fp32.generate(["A fine prompt", prompt], OK, use_tqdm=False)
    _still_serves(llm_fp32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
    (dict(max_tokens=-5), "max_tokens must be at least 1, got -5"),
    (dict(temperature=-0.1), "temperature must be non-negative"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be -1"),
    (dict(top_k=-2), "top_k must be -1"),
])
def test_bad_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logprobs_above_max_logprobs_is_refused(llm_fp32):
    with pytest.raises(ValueError, match="Requested logprobs=21 .*greater than max allowed: max_logprobs=20"):
        llm_fp32.generate("Hi", SamplingParams(logprobs=21), use_tqdm=False)
    _still_serves(llm_fp32)


def test_duplicate_request_id_is_refused_and_the_first_request_finishes(llm_fp32):
    engine = llm_fp32.llm_engine
    engine.add_request("dup", "Hello there", SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
        engine.add_request("dup", "Something else", OK)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == ["dup"]
    assert outputs[-1].prompt == "Hello there" and len(outputs[-1].outputs[0].token_ids) == 3


def test_request_larger_than_the_whole_kv_cache_is_refused_up_front():
    llm = LLM(dtype="float32", max_model_len=1024, num_gpu_blocks_override=4)   # 64 tokens of cache
    with pytest.raises(ValueError, match="needs up to 7 KV cache blocks .* the cache has 4"):
        llm.generate("Hi " * 50, SamplingParams(max_tokens=50), use_tqdm=False)
    _still_serves(llm)


def test_unknown_model_path(llm_fp32):
    with pytest.raises(ValueError, match="/no/such/model': no such file or directory; pass a local model directory"):
        LLM(model="/no/such/model")
    _still_serves(llm_fp32)


def test_directory_without_config_json(tmp_path, llm_fp32):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json"):
        LLM(model=str(tmp_path))
    _still_serves(llm_fp32)


def test_unsupported_architecture(tmp_path, llm_fp32):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(model=str(tmp_path))
    _still_serves(llm_fp32)


def test_corrupt_safetensors(tmp_path, smollm_dir, llm_fp32):
    (tmp_path / "config.json").write_text((smollm_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="corrupt safetensors file .*model.safetensors"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, kv_cache_space=0.01)
    _still_serves(llm_fp32)


def test_unknown_device_lists_the_registered_platforms(llm_fp32):
    with pytest.raises(ValueError, match=r"unknown device 'tpu9'; registered platforms: auto, .*cpu"):
        LLM(device="tpu9")
    _still_serves(llm_fp32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqz=4), "unknown keyword argument 'max_num_seqz'; did you mean 'max_num_seqs'"),
    (dict(dtype="float8"), "dtype='float8' is not supported; allowed: auto, float32, bfloat16, float16"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(max_model_len=10 ** 6), "max_model_len=1000000 is larger than the model's maximum context length"),
    (dict(quantization="awq"), "quantization='awq' loads AWQ checkpoints; this model has no AWQ quantization_config"),
    (dict(quantization="marlin"), r"quantization='marlin' is not supported on the cpu platform; it runs: neuron_quant, "
                                  "int8, w8a8, fp8, awq, gptq, compressed-tensors, bitsandbytes, gguf"),
    (dict(tensor_parallel_size=2), "tensor_parallel_size=2 exceeds"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=256, max_model_len=1024),
     "without chunked prefill a whole prompt must fit in one step"),
    (dict(compilation_config=5), "compilation_config level must be 0, 1, 2 or 3, got 5"),
    (dict(compilation_config="max"), "compilation_config must be an int level or a dict, got str"),
    (dict(compilation_config={"level": 3, "backend": "eager"}),
     r"compilation_config: unknown keys \['backend'\]; supported: level, cudagraph_capture_sizes"),
    (dict(compilation_config={"level": 3, "cudagraph_capture_sizes": [1, 512]}, max_num_seqs=64),
     r"compilation_config.cudagraph_capture_sizes: bucket 512 is larger than max_num_seqs \(64\)"),
])
def test_bad_engine_settings_name_the_setting(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LLM(**kwargs)
