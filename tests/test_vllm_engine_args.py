"""Every setting of vLLM's EngineArgs is known to plexus: honoured, or refused with why (and, for work that is
planned, the issue that adds it). The names come from vLLM's own EngineArgs at a named release, committed in
tests/data/vllm_engine_args.json by tests/data/make_vllm_engine_args.py; the CLI flags follow from the fields."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from plexus import EngineArgs
from plexus.core.unsupported_settings import UNSUPPORTED
from plexus.entrypoints.arg_parser import FlexibleArgumentParser

VLLM = json.loads((Path(__file__).parent / "data" / "vllm_engine_args.json").read_text())
VLLM_FIELDS = {f["name"]: f for f in VLLM["fields"]}


def test_the_list_is_vllm_engine_args_at_a_named_release():
    assert VLLM["version"] == "0.32.0" and VLLM["commit"]
    assert len(VLLM_FIELDS) == 256
    assert {"hf_overrides", "kv_cache_dtype", "enable_sleep_mode", "max_cudagraph_capture_size", "logits_processors",
            "override_generation_config", "hf_token"} <= set(VLLM_FIELDS)


def test_every_vllm_engine_setting_is_a_plexus_engine_setting():
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    assert sorted(set(VLLM_FIELDS) - known) == []


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_refused_setting_is_accepted_at_vllms_default(name):
    if "default" in VLLM_FIELDS.get(name, {}):
        assert UNSUPPORTED[name].accepts(VLLM_FIELDS[name]["default"]), VLLM_FIELDS[name]
    assert UNSUPPORTED[name].why
    field = next(f for f in dataclasses.fields(EngineArgs) if f.name == name)
    assert UNSUPPORTED[name].accepts(field.default)


@pytest.mark.parametrize("name, value, reason", [
    ("kv_cache_dtype", "fp8", "quantized KV caches"),
    ("enable_sleep_mode", True, "sleep mode"),
    ("speculative_config", {"method": "ngram", "num_speculative_tokens": 3}, "issue 28"),
    ("data_parallel_size", 2, "issue 30"),
    ("pipeline_parallel_size", 2, "issue 30"),
    ("reasoning_parser", "qwen3", "issue 32"),
    ("limit_mm_per_prompt", {"image": 2}, "text-only models"),
    ("logits_processors", ["my_module.MyProcessor"], r"SamplingParams\(logits_processors"),
    ("runner", "pooling", "pooling models"),
    ("attention_backend", "FLASH_ATTN", "CUDA kernel backends"),
    ("async_scheduling", True, "asynchronous scheduling"),
    ("disable_cascade_attn", False, "no cascade attention"),
])
def test_a_refused_setting_names_itself_and_why(name, value, reason):
    with pytest.raises(ValueError, match=f"^{name}=.*{reason}.*leave it at its default"):
        EngineArgs(**{name: value}).create_engine_config()


def test_values_that_describe_what_plexus_does_are_accepted():
    config = EngineArgs(disable_sliding_window=True, async_scheduling=False, model_impl="vllm", runner="generate",
                        kv_cache_dtype="auto", disable_cascade_attn=True).create_engine_config()
    assert config.model.max_model_len > 0


def test_hf_overrides_are_merged_into_the_model_config():
    config = EngineArgs(hf_overrides={"max_position_embeddings": 1024, "rms_norm_eps": 1e-3}).create_engine_config()
    assert config.model.max_model_len == 1024          # the bundled model's own is 8192
    assert config.model.hf_config.rms_norm_eps == 1e-3

    def shorten(hf_config):
        hf_config.max_position_embeddings = 512
        return hf_config

    assert EngineArgs(hf_overrides=shorten).create_engine_config().model.max_model_len == 512
    with pytest.raises(ValueError, match="hf_overrides must be a dict or a callable"):
        EngineArgs(hf_overrides=[("max_position_embeddings", 1)]).create_engine_config()


def test_override_generation_config_is_merged_over_generation_config_json():
    from plexus.core.sampling_params import SamplingParams, generation_defaults

    base = EngineArgs().create_engine_config().model.generation_config
    config = EngineArgs(override_generation_config={"temperature": 0.25, "top_k": 7}).create_engine_config()
    assert config.model.generation_config == {**base, "temperature": 0.25, "top_k": 7}
    defaults = generation_defaults(config.model.generation_config, SamplingParams())
    assert (defaults["temperature"], defaults["top_k"]) == (0.25, 7)
    assert EngineArgs(generation_config="vllm", override_generation_config={"top_p": 0.5}) \
        .create_engine_config().model.generation_config == {"top_p": 0.5}


def test_generation_config_may_name_a_directory(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.125}))
    config = EngineArgs(generation_config=str(tmp_path)).create_engine_config()
    assert config.model.generation_config == {"temperature": 0.125}
    with pytest.raises(ValueError, match="generation_config=.*holding generation_config.json"):
        EngineArgs(generation_config=str(tmp_path / "nowhere")).create_engine_config()


def test_hf_token_is_passed_to_huggingface_hub(tmp_path, monkeypatch, smollm_dir):
    import huggingface_hub

    from tests.test_hub import COMMIT, REPO, _add_to_cache

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _add_to_cache(tmp_path / "hf" / "hub", REPO, COMMIT, smollm_dir)
    tokens = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        tokens.append(kwargs.get("token"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    EngineArgs(model=REPO, hf_token="hf_secret").create_engine_config()
    assert tokens and set(tokens) == {"hf_secret"}


def test_max_cudagraph_capture_size_bounds_the_compiled_batch_sizes():
    assert EngineArgs(max_cudagraph_capture_size=8).create_engine_config().compilation.cudagraph_capture_sizes \
        == [1, 2, 4, 8]
    assert EngineArgs(cudagraph_capture_sizes=[1, 3, 6]).create_engine_config().compilation.cudagraph_capture_sizes \
        == [1, 3, 6]
    assert EngineArgs(compilation_config={"level": 3, "max_cudagraph_capture_size": 4}) \
        .create_engine_config().compilation.cudagraph_capture_sizes == [1, 2, 4]
    with pytest.raises(ValueError, match="max_cudagraph_capture_size=4 must be the largest"):
        EngineArgs(cudagraph_capture_sizes=[1, 2, 8], max_cudagraph_capture_size=4).create_engine_config()
    with pytest.raises(ValueError, match="cudagraph_capture_sizes=.*differs from compilation_config"):
        EngineArgs(cudagraph_capture_sizes=[2], compilation_config={"cudagraph_capture_sizes": [4]}) \
            .create_engine_config()


def test_kv_cache_memory_bytes_sizes_the_kv_cache():
    config = EngineArgs(kv_cache_memory_bytes=50_000_000).create_engine_config()
    m = config.model
    assert (m.num_layers, m.num_kv_heads, m.head_dim, config.cache.block_size) == (30, 3, 64, 16)
    per_block = 2 * 30 * 16 * 3 * 64 * torch.empty((), dtype=m.dtype).element_size()
    assert config.cache.num_gpu_blocks_override == 50_000_000 // per_block
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=100 holds no KV block"):
        EngineArgs(kv_cache_memory_bytes=100).create_engine_config()
    with pytest.raises(ValueError, match="set one of them"):
        EngineArgs(kv_cache_memory_bytes=50_000_000, num_gpu_blocks_override=10).create_engine_config()


def test_log_level_sets_the_plexus_logger():
    plexus_logger = logging.getLogger("plexus")
    before = plexus_logger.level
    try:
        EngineArgs(log_level="debug").create_engine_config()
        assert plexus_logger.level == logging.DEBUG
    finally:
        plexus_logger.setLevel(before)
    with pytest.raises(ValueError, match="log_level must be"):
        EngineArgs(log_level="loud").create_engine_config()


def test_vllms_none_defaults_mean_plexus_defaults():
    args = EngineArgs(max_num_seqs=None, enable_prefix_caching=None, enable_chunked_prefill=None)
    assert (args.max_num_seqs, args.enable_prefix_caching, args.enable_chunked_prefill) == (256, True, True)


def _cli(*argv: str) -> EngineArgs:
    return EngineArgs.from_cli_args(EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(list(argv)))


def test_every_vllm_setting_is_a_flag_and_the_flags_follow_the_fields():
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    flags = {option for action in parser._actions for option in action.option_strings}
    assert sorted(f"--{n.replace('_', '-')}" for n in VLLM_FIELDS if not n.startswith("_")
                  if f"--{n.replace('_', '-')}" not in flags) == []
    args = _cli("--hf-overrides", '{"max_position_embeddings": 768}', "--max-cudagraph-capture-size", "16",
                "--hf-token", "--cudagraph-capture-sizes", "1", "2", "16")
    assert (args.hf_overrides, args.max_cudagraph_capture_size, args.hf_token) == \
        ({"max_position_embeddings": 768}, 16, True)
    config = args.create_engine_config()
    assert config.model.max_model_len == 768 and config.compilation.cudagraph_capture_sizes == [1, 2, 16]


def test_a_refused_flag_fails_naming_the_setting():
    from plexus.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])
    with pytest.raises(ValueError, match="^kv_cache_dtype='fp8' is not supported"):
        EngineArgs.from_cli_args(args).create_engine_config()
    with pytest.raises(ValueError, match="^enable_sleep_mode=True is not supported: sleep mode"):
        _cli("--enable-sleep-mode").create_engine_config()
    assert _cli("--no-enable-sleep-mode").enable_sleep_mode is False
