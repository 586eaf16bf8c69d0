"""The Neuron platform on a machine without Neuron devices: the runner, bucket
choice, padding and per-bucket graph compilation run for real through the
CPU reference backend; the SDK path is checked through the exact arguments
it would hand to transformers-neuronx; every bad setting has its message."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from plexus import LLM, EngineArgs, SamplingParams
from plexus.core import buckets
from plexus.envs import Environment
from plexus.platforms.neuron import NeuronPlatform, missing_requirements, sdk, settings
from plexus.platforms.neuron.worker import BucketCall

REFERENCE = {"backend": "cpu-reference"}
CONTEXT_BUCKETS, TOKEN_GEN_BUCKETS = [32, 128], [64, 256]
TEXT = ("The history of the city begins with a small fishing village on the river bank. Over the centuries "
        "merchants arrived from the south, bringing salt, cloth and new ideas about building with stone. "
        "A cathedral rose in the twelfth century, and the market square around it became the heart of trade. "
        "During the wars of the sixteenth century the walls were rebuilt twice, and the old bridge was burned. "
        "Later, railways connected the city to the capital, factories grew along the water, and the population "
        "doubled within one generation. Today visitors walk the narrow streets of the old town, eat fish in "
        "the harbour restaurants and climb the tower for a view of the hills beyond the river valley.")
PROMPT_LENGTHS = [3, 11, 25, 31, 45, 70, 100, 120]     # both context buckets; decodes cross 64 -> 256


@pytest.fixture(scope="module")
def neuron_llm():
    with pytest.MonkeyPatch.context() as mp:       # settings are read once, when the engine is built
        mp.setenv(settings.CONTEXT_BUCKETS_ENV, ",".join(map(str, CONTEXT_BUCKETS)))
        mp.setenv(settings.TOKEN_GEN_BUCKETS_ENV, ",".join(map(str, TOKEN_GEN_BUCKETS)))
        return LLM(device="neuron", dtype="float32", max_model_len=256, max_num_seqs=4,
                   override_neuron_config=REFERENCE)


def _config(**kwargs):
    args = dict(device="neuron", dtype="float32", max_model_len=256, max_num_seqs=4,
                override_neuron_config=REFERENCE)
    args.update(kwargs)
    return EngineArgs(**args).create_engine_config()


def test_greedy_fp32_matches_the_cpu_platform_bucket_by_bucket(neuron_llm, llm_fp32, smollm_tokenizer, monkeypatch):
    ids = smollm_tokenizer.encode(TEXT)
    assert len(ids) >= max(PROMPT_LENGTHS)
    prompts = [{"prompt_token_ids": ids[:n]} for n in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm_fp32.generate(prompts, params, use_tqdm=False)]

    engine = neuron_llm.llm_engine
    worker = engine.executor.worker
    runner, model = worker.runner, worker.model
    steps, slots = [], {}
    execute = runner.execute

    def recording_execute(step):
        result = execute(step)
        steps.append(([(s.request_id, s.start, s.num_tokens) for s in step.sequences], runner.last_step))
        for s in step.sequences:
            slots.setdefault(s.request_id, set()).add(s.block_ids[0])
        return result

    monkeypatch.setattr(runner, "execute", recording_execute)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids

    assert [outputs[str(i)] for i in range(len(prompts))] == expected

    # Every step: one token-generation call for all decoding sequences (in the smallest token-gen bucket
    # that holds the furthest position), then one context call per new prompt, padded to its bucket.
    used = set()
    for scheduled, calls in steps:
        decodes = [start for _, start, n in scheduled if start > 0]
        prefills = [n for _, start, n in scheduled if start == 0]
        want = ([BucketCall("token_gen", buckets.pick_bucket(max(decodes) + 1, TOKEN_GEN_BUCKETS), len(decodes))]
                if decodes else [])
        want += [BucketCall("context", buckets.pick_bucket(n, CONTEXT_BUCKETS), 1) for n in prefills]
        assert calls == want
        assert len(scheduled) <= 4
        used.update((c.kind, c.bucket) for c in calls)
    assert used == {("context", 32), ("context", 128), ("token_gen", 64), ("token_gen", 256)}
    # One compiled graph per bucket used, no more (no recompiles).
    assert set(model.graphs) == used
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == len(used)
    # Eight requests through four slots: each request kept one slot, and slots were reused.
    assert all(len(s) == 1 for s in slots.values())
    assert {next(iter(s)) for s in slots.values()} == {0, 1, 2, 3}


def test_requests_that_no_bucket_can_serve_are_refused_at_add_request(neuron_llm):
    engine = neuron_llm.llm_engine
    with pytest.raises(ValueError, match=r"129 tokens, more than the largest bucket of "
                                         r"NEURON_CONTEXT_LENGTH_BUCKETS \(128\)"):
        engine.add_request("long-prompt", {"prompt_token_ids": [1] * 129}, SamplingParams(max_tokens=1))
    # max_model_len is 256 and so is the largest token-gen bucket: past it, max_tokens is clipped as on CPU.
    engine.add_request("clipped", {"prompt_token_ids": [1] * 100}, SamplingParams(max_tokens=1000))
    engine.abort_request("clipped")
    with pytest.raises(ValueError, match="prompt_logprobs is not supported on the neuron platform"):
        engine.add_request("plp", "Hello", SamplingParams(prompt_logprobs=1))
    assert not engine.has_unfinished_requests()


def test_sequences_past_the_largest_token_gen_bucket_are_refused(monkeypatch):
    monkeypatch.setenv(settings.CONTEXT_BUCKETS_ENV, "32")
    monkeypatch.setenv(settings.TOKEN_GEN_BUCKETS_ENV, "64,128")
    config = _config()
    assert config.scheduler.max_seq_len == (128, "NEURON_TOKEN_GEN_BUCKETS")
    from plexus.core.input_processor import InputProcessor

    inputs = InputProcessor(config, tokenizer=None)   # the check needs only the config, not a compiled model
    with pytest.raises(ValueError, match=r"needs 130 positions, more than the largest bucket of "
                                         r"NEURON_TOKEN_GEN_BUCKETS \(128\)"):
        inputs._max_sequence_len([1] * 30, SamplingParams(max_tokens=100))
    assert inputs._max_sequence_len([1] * 30, SamplingParams(max_tokens=98)) == 128
    assert inputs._max_sequence_len([1] * 30, SamplingParams(max_tokens=None)) == 128


def test_config_step_fits_the_engine_to_one_slot_per_sequence():
    config = _config(max_num_seqs=3, max_num_batched_tokens=64)
    assert config.cache.block_size == 256 and not config.cache.enable_prefix_caching
    assert not config.scheduler.enable_chunked_prefill
    assert config.scheduler.max_num_batched_tokens >= 256 + 3
    s = config.extra["neuron_settings"]
    assert (s.context_buckets, s.token_gen_buckets, s.batch_size, s.amp, s.quant_dtype) == ([256], [256], 3, "f32", "s8")
    # An explicit block_size equal to max_model_len is what vLLM's Neuron examples pass.
    assert _config(block_size=256).cache.block_size == 256


# ---------------------------------------------------------------- every bad setting, named


@pytest.mark.parametrize("var", [settings.CONTEXT_BUCKETS_ENV, settings.TOKEN_GEN_BUCKETS_ENV])
@pytest.mark.parametrize("value, message", [
    ("128,x", r"='128,x': 'x' is not an integer; expected comma-separated positive integers"),
    ("0,64", r": bucket 0 is not a positive integer"),
    ("64,-8", r": bucket -8 is not a positive integer"),
    ("128,512", r": bucket 512 is larger than max_model_len \(256\)"),
])
def test_bad_bucket_variables_are_named(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var + message):
        _config()


def test_context_buckets_must_fit_the_token_gen_buckets(monkeypatch):
    monkeypatch.setenv(settings.CONTEXT_BUCKETS_ENV, "64,256")
    monkeypatch.setenv(settings.TOKEN_GEN_BUCKETS_ENV, "128")
    with pytest.raises(ValueError, match=r"NEURON_CONTEXT_LENGTH_BUCKETS: the largest context bucket \(256\) is "
                                         r"larger than the largest NEURON_TOKEN_GEN_BUCKETS bucket \(128\)"):
        _config()


def test_bad_quant_dtype_is_named(monkeypatch):
    monkeypatch.setenv(settings.QUANT_DTYPE_ENV, "int4")
    with pytest.raises(ValueError, match=r"NEURON_QUANT_DTYPE='int4' is not supported; allowed: s8, f8e4m3fn"):
        _config()
    with pytest.raises(ValueError, match=r"NEURON_QUANT_DTYPE='int4' is not supported"):
        _config(quantization="neuron_quant")


@pytest.mark.parametrize("overrides, message", [
    ({"fuse_qvk": True}, r": unknown NeuronConfig key 'fuse_qvk' \(did you mean 'fuse_qkv'\?\); allowed: "
                         r"NeuronConfig's keys \(sparse_attn, quant, "),
    ({"continuous_batching": {}}, r"\['continuous_batching'\] cannot be overridden: it is built from max_num_seqs"),
    ({"quant": None}, r"\['quant'\] cannot be overridden: it is built from quantization='neuron_quant'"),
    ({"cast_logits_dtype": "int8"}, r"\['cast_logits_dtype'\]='int8' is not supported; allowed: float32, "
                                    r"float16, bfloat16"),
    ({"attention_layout": "XYZ"}, r"\['attention_layout'\]='XYZ' is not a layout; allowed: BSH, HSB, SBH"),
    ({"fuse_qkv": "yes"}, r"\['fuse_qkv'\] must be True or False, got 'yes'"),
    ({"backend": "gpu"}, r"\['backend'\]='gpu' is not a plexus Neuron backend; allowed: transformers-neuronx, "
                         r"cpu-reference"),
])
def test_bad_override_neuron_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=r"override_neuron_config" + message):
        _config(override_neuron_config={**REFERENCE, **overrides})


def test_single_bucket_bsh_cache_layout(monkeypatch):
    monkeypatch.setenv(settings.TOKEN_GEN_BUCKETS_ENV, "128,256")
    with pytest.raises(ValueError, match=r"cache_layout'\]='BSH' supports a single bucket only"):
        _config(override_neuron_config={**REFERENCE, "cache_layout": "BSH"})


def test_tensor_parallel_size_is_checked_against_the_visible_cores(monkeypatch):
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0-1")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 is more than the 2 NeuronCores visible to this "
                                         r"process \(NEURON_RT_VISIBLE_CORES=0-1\)"):
        _config(tensor_parallel_size=4)
    assert _config(tensor_parallel_size=2).extra["neuron_settings"].tp_degree == 2
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0,x")
    with pytest.raises(ValueError, match=r"NEURON_RT_VISIBLE_CORES='0,x': expected core ids and ranges"):
        _config()


def test_visible_cores_come_from_the_runtime_variables_or_sysfs(tmp_path):
    assert settings.visible_neuron_cores({"NEURON_RT_VISIBLE_CORES": "0-3,8"}) == (5, "NEURON_RT_VISIBLE_CORES=0-3,8")
    assert settings.visible_neuron_cores({"NEURON_RT_NUM_CORES": "6"}) == (6, "NEURON_RT_NUM_CORES=6")
    for i in range(2):     # the driver's layout: /sys/devices/virtual/neuron_device/neuronN/core_count
        (tmp_path / f"neuron{i}").mkdir()
        (tmp_path / f"neuron{i}" / "core_count").write_text("2\n")
    assert settings.visible_neuron_cores({}, sysfs=str(tmp_path))[0] == 4
    assert settings.visible_neuron_cores({}, sysfs=str(tmp_path / "none")) is None


def test_conflicting_block_size_says_why():
    with pytest.raises(ValueError, match=r"block_size=16 conflicts with max_model_len=256: on Neuron each sequence "
                                         r"owns one KV slot of max_model_len tokens"):
        _config(block_size=16)


def test_override_neuron_config_must_be_a_dict():
    with pytest.raises(ValueError, match="override_neuron_config must be a dict of NeuronConfig settings, got str"):
        _config(override_neuron_config="cpu-reference")


def test_reference_kv_cache_must_fit_its_budget():
    with pytest.raises(ValueError, match=r"keeps a KV slot of max_model_len=8192 tokens for each of "
                                         r"max_num_seqs=256 sequences: .* GiB, more than kv_cache_space"):
        _config(max_model_len=None, max_num_seqs=256)


def test_device_neuron_without_the_sdk_says_what_is_missing_and_how_to_install():
    missing = missing_requirements()
    assert "the transformers-neuronx package" in missing and "a Neuron device (/dev/neuron0)" in missing
    assert not NeuronPlatform().is_available()
    with pytest.raises(RuntimeError, match=r"device='neuron': the Neuron platform needs the transformers-neuronx "
                                           r"package and .*pip install --extra-index-url=https://pip.repos.neuron"
                                           r".*override_neuron_config=\{'backend': 'cpu-reference'\}"):
        LLM(device="neuron")


def test_neuron_registers_through_the_entry_point_and_auto_skips_it_here():
    from importlib.metadata import entry_points

    from plexus.platforms.registry import registered_platforms, resolve_platform

    assert "plexus.platforms.neuron" in [ep.value for ep in entry_points(group="plexus.platforms")]
    assert isinstance(registered_platforms()["neuron"], NeuronPlatform)
    assert resolve_platform("auto").name == "cpu"


# ---------------------------------------------------------------- the SDK path, as arguments


@pytest.fixture
def vllm_example_config(monkeypatch):
    """The settings of vLLM's offline_inference_neuron_int8_quantization.py."""
    monkeypatch.setenv(settings.CONTEXT_BUCKETS_ENV, "128,512,1024,2048")
    monkeypatch.setenv(settings.TOKEN_GEN_BUCKETS_ENV, "128,512,1024,2048")
    monkeypatch.setenv(settings.QUANT_DTYPE_ENV, "s8")
    return _config(max_num_seqs=8, max_model_len=2048, block_size=2048, quantization="neuron_quant",
                   dtype="bfloat16", tensor_parallel_size=2,
                   override_neuron_config={**REFERENCE, "cast_logits_dtype": "bfloat16"})


def _sdk_spec(config, **changes):
    s = dataclasses.replace(config.extra["neuron_settings"], backend=settings.SDK_BACKEND, **changes)
    return sdk.model_spec(config, s, sdk_version="2.x")


def test_sdk_arguments_for_the_vllm_int8_example(vllm_example_config):
    spec = _sdk_spec(vllm_example_config)
    assert spec.model_class == "LlamaForSampling"
    assert spec.model_path == str(vllm_example_config.model.model_dir)
    assert spec.from_pretrained == {"tp_degree": 2, "n_positions": [128, 512, 1024, 2048],
                                    "context_length_estimate": [128, 512, 1024, 2048], "batch_size": 8,
                                    "amp": "bf16"}
    assert spec.neuron_config == {
        "continuous_batching": {"batch_size_for_shared_caches": 8},
        "attention_layout": "BSH", "collectives_layout": "BSH", "fuse_qkv": True,
        "quant": {"quant_dtype": "s8", "dequant_dtype": "bf16", "quantize_method": "vector_dynamic"},
        "weight_tiling": True, "cast_logits_dtype": "bfloat16"}


def test_sdk_arguments_without_quantization_and_with_f8(vllm_example_config, monkeypatch):
    plain = _sdk_spec(vllm_example_config, quantize=False, amp="f32", tp_degree=8, batch_size=2)
    assert plain.from_pretrained["amp"] == "f32" and plain.from_pretrained["tp_degree"] == 8
    assert plain.neuron_config["quant"] is None and plain.neuron_config["weight_tiling"] is False
    assert plain.neuron_config["continuous_batching"] == {"batch_size_for_shared_caches": 2}
    f8 = _sdk_spec(vllm_example_config, quant_dtype="f8e4m3fn")
    assert f8.neuron_config["quant"]["quant_dtype"] == "f8e4m3fn"
    # A user override wins over plexus's defaults.
    tiled = _sdk_spec(vllm_example_config, overrides={"weight_tiling": False, "attention_layout": "HSB"})
    assert tiled.neuron_config["weight_tiling"] is False and tiled.neuron_config["attention_layout"] == "HSB"


def test_sdk_refuses_architectures_transformers_neuronx_lacks(vllm_example_config):
    hf_config = vllm_example_config.model.hf_config
    original = hf_config.architectures
    hf_config.architectures = ["Qwen3ForCausalLM"]
    try:
        with pytest.raises(ValueError, match="the Qwen3ForCausalLM architecture has no transformers-neuronx model "
                                             "in plexus; supported on Neuron: LlamaForCausalLM, MistralForCausalLM, "
                                             "MixtralForCausalLM, Qwen2ForCausalLM"):
            _sdk_spec(vllm_example_config)
        # transformers-neuronx's own module for each (vLLM's loader names them so)
        for arch, cls in [("MistralForCausalLM", "MistralForSampling"), ("MixtralForCausalLM", "MixtralForSampling"),
                          ("Qwen2ForCausalLM", "Qwen2ForSampling")]:
            hf_config.architectures = [arch]
            assert _sdk_spec(vllm_example_config).model_class == cls
    finally:
        hf_config.architectures = original


def _with_cache_dir(config, path):
    """The config as an engine built with PLEXUS_CACHE_DIR=path would have it (the environment is read once)."""
    return dataclasses.replace(config, env=Environment.read({"PLEXUS_CACHE_DIR": str(path)}))


def test_compiled_artifacts_are_keyed_by_everything_that_changes_the_graphs(vllm_example_config, tmp_path):
    vllm_example_config = _with_cache_dir(vllm_example_config, tmp_path)
    base = _sdk_spec(vllm_example_config).artifacts_dir
    assert base == _sdk_spec(vllm_example_config).artifacts_dir
    assert base.parent == tmp_path / "neuron"
    changes = [dict(context_buckets=[128, 2048]), dict(token_gen_buckets=[2048]), dict(tp_degree=8),
               dict(batch_size=4), dict(amp="f16"), dict(quantize=False), dict(quant_dtype="f8e4m3fn"),
               dict(overrides={"cast_logits_dtype": "float32"})]
    dirs = {_sdk_spec(vllm_example_config, **c).artifacts_dir for c in changes}
    assert len(dirs) == len(changes) and base not in dirs
    assert _sdk_spec(vllm_example_config).artifacts_dir != sdk.model_spec(
        vllm_example_config, dataclasses.replace(vllm_example_config.extra["neuron_settings"],
                                                 backend=settings.SDK_BACKEND), sdk_version="3.0").artifacts_dir


class _CompilesOnce:
    """Stands in for a transformers-neuronx model's top-level save/load/to_neuron calls (our seam, not the SDK)."""

    def __init__(self) -> None:
        self.calls = []

    def load(self, directory):
        self.calls.append(("load", directory))

    def to_neuron(self):
        self.calls.append(("to_neuron",))

    def save(self, directory):
        self.calls.append(("save",))
        (Path(directory) / "graph.neff").write_text("compiled")


def test_second_start_loads_the_saved_graphs_instead_of_compiling(vllm_example_config, tmp_path):
    spec = _sdk_spec(_with_cache_dir(vllm_example_config, tmp_path))
    first = sdk.compile_or_load(_CompilesOnce(), spec)
    assert first.calls == [("to_neuron",), ("save",)]
    assert (spec.artifacts_dir / "graph.neff").exists()
    assert not [p for p in spec.artifacts_dir.parent.iterdir() if ".tmp" in p.name]
    second = sdk.compile_or_load(_CompilesOnce(), spec)
    assert second.calls == [("load", str(spec.artifacts_dir)), ("to_neuron",)]


def test_the_sdk_adapter_hands_over_prompts_unpadded():
    seen = []

    def sdk_model(input_ids, cache_ids, start_ids):
        seen.append((input_ids.tolist(), cache_ids.tolist(), start_ids.tolist(), cache_ids.dtype))
        return torch.zeros(input_ids.shape[0], 5)

    model = sdk.TransformersNeuronxModel(sdk_model)
    model(torch.tensor([[7, 8, 9, 0, 0]]), torch.tensor([[0, 1, 2, 0, 0]]), torch.tensor([3]))
    model(torch.tensor([[4], [0]]), torch.tensor([[17], [0]]), torch.tensor([0, 1]))
    assert seen == [([[7, 8, 9]], [[0, 1, 2]], [3], torch.int32), ([[4], [0]], [[17], [0]], [0, 1], torch.int32)]


def test_defaults_when_no_neuron_variable_is_set():
    s = settings.read_settings(_config(), {}, None)
    assert (s.context_buckets, s.token_gen_buckets, s.quant_dtype, s.cast_logits_dtype) == ([256], [256], "s8",
                                                                                             "float32")


def test_override_neuron_config_from_the_command_line():
    from plexus.utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--device", "neuron", "--override-neuron-config",
                              '{"backend": "cpu-reference", "cast_logits_dtype": "bfloat16"}'])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.override_neuron_config == {"backend": "cpu-reference", "cast_logits_dtype": "bfloat16"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--override-neuron-config", "{backend: x}"])


def test_enable_lora_on_neuron_is_refused_naming_the_platform():
    with pytest.raises(ValueError, match=r"enable_lora=True: the neuron platform does not serve LoRA adapters; the "
                                         r"cpu platform does"):
        _config(enable_lora=True)
