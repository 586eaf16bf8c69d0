"""Every adapter plexus cannot serve is refused at add_request / add_lora with a message naming the feature,
and the engine then serves a healthy request. Adapters are written by PEFT itself (DoRA, lora_bias,
modules_to_save, too high a rank), or a good one is damaged on disk (config, weights, missing files)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from plexus import EngineArgs, LLMEngine, SamplingParams
from plexus.lora.request import LoRARequest
from test_lora import make_adapter

PROMPT = {"prompt_token_ids": [5, 17, 42, 7, 99, 3]}


def _peft(base, out, **config) -> str:
    return make_adapter(base, out, 0, **config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-errors")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    good = _peft(root / "base", root / "good", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(root / "base"), skip_tokenizer_init=True, dtype="float32", enable_lora=True, max_loras=2,
        max_lora_rank=16, max_cpu_loras=2, kv_cache_space=0.02))
    return root, good, engine


def _serves(engine, lora=None) -> list[int]:
    """A request runs to completion (with `lora`, or no adapter) next to whatever failed before."""
    engine.add_request("healthy", PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       lora_request=lora)
    tokens = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = list(out.outputs[0].token_ids)
    assert tokens is not None and len(tokens) == 4
    return tokens


def _copy(good, root, name) -> str:
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(good, target)
    return str(target)


def _edit_config(path, **changes) -> None:
    config_path = f"{path}/adapter_config.json"
    config = json.loads(open(config_path).read())
    config.update(changes)
    open(config_path, "w").write(json.dumps(config))


def _bad_adapters(root, good):
    """name -> (adapter path, the message it must be refused with)."""
    base = root / "base"
    cases = {
        "dora": (_peft(base, root / "dora", r=8, target_modules=["q_proj"], use_dora=True),
                 r"DoRA \(use_dora=true\) is not supported"),
        "lora-bias": (_peft(base, root / "lora-bias", r=8, target_modules=["q_proj"], lora_bias=True),
                      r"lora_bias=true \(a bias on lora_B\) is not supported"),
        "modules-to-save": (_peft(base, root / "mts", r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                            r"modules_to_save=\['lm_head'\] .*is not supported"),
        "rank-above-max": (_peft(base, root / "r32", r=32, target_modules=["v_proj"]),
                           r"has rank 32, above max_lora_rank=16; raise max_lora_rank"),
    }
    missing_module = _copy(good, root, "missing-module")
    _edit_config(missing_module, target_modules=["q_proj", "v_proj", "foo_proj"])
    cases["config-target-the-model-lacks"] = (missing_module, r"target module foo_proj: the model has no such module")
    renamed = _copy(good, root, "renamed-tensor")
    tensors = load_file(f"{renamed}/adapter_model.safetensors")
    tensors = {k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()}
    save_file(tensors, f"{renamed}/adapter_model.safetensors")
    _edit_config(renamed, target_modules=["v_proj"])
    cases["tensor-target-the-model-lacks"] = (renamed, r"target module 'layers.0.self_attn.qq_proj': the model has no "
                                                       r"such module; plexus serves LoRA on .*q_proj")
    no_config = _copy(good, root, "no-config")
    (root / "no-config" / "adapter_config.json").unlink()
    cases["no-config"] = (no_config, r"has no adapter_config.json")
    no_weights = _copy(good, root, "no-weights")
    (root / "no-weights" / "adapter_model.safetensors").unlink()
    cases["no-weights"] = (no_weights, r"has no adapter_model.safetensors or adapter_model.bin")
    bad_json = _copy(good, root, "bad-json")
    (root / "bad-json" / "adapter_config.json").write_text("{not json")
    cases["bad-json"] = (bad_json, r"could not read .*adapter_config.json")
    corrupt = _copy(good, root, "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    cases["corrupt-weights"] = (corrupt, r"could not read .*adapter_model.safetensors")
    cases["no-such-path"] = (str(root / "does-not-exist"), r"no such file or directory")
    shapes = _copy(good, root, "wrong-shapes")
    tensors = load_file(f"{shapes}/adapter_model.safetensors")
    tensors = {k: (v[:, :32].contiguous() if "lora_A" in k else v) for k, v in tensors.items()}
    save_file(tensors, f"{shapes}/adapter_model.safetensors")
    cases["another-base-model"] = (shapes, r"do not fit the model's layer .*is the adapter for another base model")
    return cases


def test_every_bad_adapter_is_refused_naming_the_feature_and_the_engine_goes_on(setup, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, good, engine = setup
    for index, (name, (path, message)) in enumerate(_bad_adapters(root, good).items()):
        lora = LoRARequest(name, 100 + index, path)
        with pytest.raises(ValueError, match=message):
            engine.add_request(f"bad-{name}", PROMPT, SamplingParams(max_tokens=2), lora_request=lora)
        assert not engine.has_unfinished_requests(), name
        with pytest.raises(ValueError, match=message):
            engine.add_lora(lora)
        assert 100 + index not in engine.list_loras()
    _serves(engine, LoRARequest("good", 1, good))
    _serves(engine)


def test_bad_ids_and_one_id_with_two_paths_are_refused(setup, tmp_path):
    root, good, engine = setup
    with pytest.raises(ValueError, match=r"lora_int_id must be > 0, got 0"):
        LoRARequest("zero", 0, good)
    with pytest.raises(ValueError, match=r"lora_int_id must be > 0, got -3"):
        LoRARequest("negative", -3, good)
    other = _copy(good, tmp_path, "other")
    engine.add_lora(LoRARequest("first", 7, good))
    with pytest.raises(ValueError, match=r"lora_int_id=7 already names the adapter at .*'first'.*One id names one "
                                         r"adapter"):
        engine.add_request("clash", PROMPT, SamplingParams(max_tokens=2), lora_request=LoRARequest("second", 7, other))
    assert not engine.has_unfinished_requests()
    _serves(engine, LoRARequest("first", 7, good))


def test_a_lora_request_without_enable_lora_is_refused(setup):
    root, good, _ = setup
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(root / "base"), skip_tokenizer_init=True,
                                                   dtype="float32", kv_cache_space=0.02))
    with pytest.raises(ValueError, match=r"lora_request 'good' given but LoRA is not enabled; create the engine "
                                         r"with enable_lora=True"):
        engine.add_request("x", PROMPT, SamplingParams(max_tokens=2), lora_request=LoRARequest("good", 1, good))
    _serves(engine)


def test_a_bin_adapter_is_read_with_weights_only_and_gives_the_same_output(setup, tmp_path):
    root, good, engine = setup
    binary = _copy(good, tmp_path, "binary")
    tensors = load_file(f"{binary}/adapter_model.safetensors")
    torch.save(tensors, f"{binary}/adapter_model.bin")
    (tmp_path / "binary" / "adapter_model.safetensors").unlink()
    assert _serves(engine, LoRARequest("bin", 20, binary)) == _serves(engine, LoRARequest("st", 21, good))


def test_an_adapter_given_as_a_hub_id_is_read_from_the_cache(setup, tmp_path, monkeypatch):
    from test_hub import _add_to_cache

    root, good, engine = setup
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hf" / "hub"
    (hub / "models--acme--qv-lora").mkdir(parents=True)
    # _add_to_cache links the files it recognises; the adapter's are a .json and a .safetensors.
    _add_to_cache(hub, "acme/qv-lora", "c" * 40, __import__("pathlib").Path(good))
    fresh = LLMEngine.from_engine_args(EngineArgs(
        model=str(root / "base"), skip_tokenizer_init=True, dtype="float32", enable_lora=True, max_lora_rank=16,
        kv_cache_space=0.02))
    assert _serves(fresh, LoRARequest("hub", 1, "acme/qv-lora")) == _serves(engine, LoRARequest("good", 1, good))
    with pytest.raises(ValueError, match=r"'acme/missing': not a local path, and not in the Hugging Face cache"):
        fresh.add_lora(LoRARequest("missing", 2, "acme/missing"))
