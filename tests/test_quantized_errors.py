"""A quantized checkpoint that is wrong gets an error naming the tensor or the setting and the problem when
the engine is built, before any request: a wrong shape or dtype, a group size that does not divide the
input dimension, a missing scale, an unknown quant_method, a bits value the method lacks; and a platform
asked for a method it does not run names itself and the methods it has."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from safetensors.torch import load_file, save_file

from plexus import LLM, EngineArgs

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "quantized"
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _copy(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def _edit_tensors(path: pathlib.Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def _edit_config(path: pathlib.Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def _load(path: pathlib.Path) -> LLM:
    return LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=64, kv_cache_space=0.01)


def test_a_scale_of_the_wrong_shape_is_named(tmp_path):
    path = _copy(tmp_path, "gptq-4bit-g64-asym")
    _edit_tensors(path, lambda t: t.__setitem__(f"{Q_PROJ}.scales", t[f"{Q_PROJ}.scales"][:1]))
    with pytest.raises(ValueError, match=r"checkpoint tensor 'layers.0.self_attn.q_proj.scales' has shape \(1, 128\)"):
        _load(path)


def test_packed_weights_of_the_wrong_dtype_are_named(tmp_path):
    path = _copy(tmp_path, "awq-gemm-4bit-g64")
    _edit_tensors(path, lambda t: t.__setitem__(f"{Q_PROJ}.qweight", t[f"{Q_PROJ}.qweight"].float()))
    with pytest.raises(ValueError, match=r"'layers.0.self_attn.q_proj.qweight' has dtype torch.float32, "
                                         r"expected torch.int32"):
        _load(path)


def test_a_missing_scale_is_named(tmp_path):
    path = _copy(tmp_path, "ct-w4a16-g64")
    _edit_tensors(path, lambda t: t.pop(f"{Q_PROJ}.weight_scale"))
    with pytest.raises(ValueError, match=r"missing 1 tensors, e.g. \['layers.0.self_attn.qkv_proj.weight_scale#0'\]"):
        _load(path)


def test_a_group_size_that_does_not_divide_the_input_is_named(tmp_path):
    path = _copy(tmp_path, "gptq-4bit-g64-asym")
    _edit_config(path, lambda c: c.update(group_size=48))
    (path / "quantize_config.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input dimension 128 of layer "
                                         r"'layers.0.self_attn.qkv_proj'"):
        _load(path)


def test_bits_the_method_lacks_are_named(tmp_path):
    path = _copy(tmp_path, "gptq-4bit-g64-asym")
    _edit_config(path, lambda c: c.update(bits=3))
    with pytest.raises(ValueError, match=r"gptq: bits=3 is not supported; supported: 2, 4, 8"):
        _load(path)
    path = _copy(tmp_path, "ct-w4a16-g64")
    _edit_config(path, lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=2))
    with pytest.raises(ValueError, match=r"config_groups\['group_0'\]: num_bits=2 is not supported for "
                                         r"pack-quantized; supported: 4, 8"):
        _load(path)


def test_activation_scales_plexus_would_not_honour_are_refused(tmp_path):
    """compressed-tensors int8 activations by group (vLLM has no such kernel) and static activations by token
    (no input_scale per token exists) would otherwise run per token or per tensor without saying so."""
    path = _copy(tmp_path, "ct-w8a8")
    _edit_config(path, lambda c: c["config_groups"]["group_0"]["input_activations"].update(strategy="group",
                                                                                          group_size=64))
    with pytest.raises(ValueError, match=r"config_groups\['group_0'\]: dynamic input activations by 'group' are "
                                         r"not supported for int weights; supported: tensor, token"):
        _load(path)
    path = _copy(tmp_path, "ct-fp8")
    _edit_config(path, lambda c: c["config_groups"]["group_0"]["input_activations"].update(strategy="token"))
    with pytest.raises(ValueError, match=r"static input activations by 'token' are not supported for float "
                                         r"weights; supported: tensor"):
        _load(path)


def test_an_unknown_quant_method_is_named(tmp_path):
    path = _copy(tmp_path, "awq-gemm-4bit-g64")
    _edit_config(path, lambda c: c.update(quant_method="squeezellm"))
    with pytest.raises(ValueError, match=r"quantized with quant_method='squeezellm' .* not supported on the cpu "
                                         r"platform; it runs: neuron_quant, int8, w8a8, fp8, awq, gptq"):
        _load(path)


def test_g_idx_out_of_range_is_named(tmp_path):
    path = _copy(tmp_path, "gptq-4bit-g32-desc-act")
    _edit_tensors(path, lambda t: t[f"{Q_PROJ}.g_idx"].__setitem__(0, 99))
    with pytest.raises(ValueError, match=r"layers.0.self_attn.qkv_proj: g_idx values must lie in \[0, 4\)"):
        _load(path)


def test_the_neuron_platform_refuses_checkpoint_formats():
    args = EngineArgs(model=str(FIXTURES / "awq-gemm-4bit-g64"), device="neuron", skip_tokenizer_init=True,
                      max_model_len=64, override_neuron_config={"backend": "cpu-reference"})
    with pytest.raises(ValueError, match=r"quant_method='awq' .* not supported on the neuron platform; "
                                         r"it runs: neuron_quant$"):
        args.create_engine_config()


def test_quantization_named_by_the_user_must_match_the_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"quantization='gptq' does not match the checkpoint, which is quantized "
                                         r"with 'awq'"):
        LLM(model=str(FIXTURES / "awq-gemm-4bit-g64"), quantization="gptq", skip_tokenizer_init=True)


def test_a_full_precision_checkpoint_is_not_a_gptq_one(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"quantization='gptq' loads GPTQ checkpoints; this model has no GPTQ"):
        LLM(model=str(tmp_path), quantization="gptq", skip_tokenizer_init=True)
