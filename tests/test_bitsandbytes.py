"""quantization="bitsandbytes": checkpoints quantized and saved by transformers + bitsandbytes (NF4 with
double quantization, FP4, LLM.int8) and in-flight NF4 of an unquantized checkpoint, checked against
bitsandbytes' own dequantization and against transformers running the same quantized model."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open

import transformers

from plexus import LLM, SamplingParams
from plexus.models.quantization import bitsandbytes as bnb_method
from plexus.models.quantization import make_quant_config

bnbF = bnb_method.import_bitsandbytes().functional

VOCAB = 256
PROMPT = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1)).tolist()
SHARDS = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
          "gate_up_proj": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}
QUANTIZED = {   # checkpoint name -> transformers' BitsAndBytesConfig arguments
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-skip-down_proj": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", llm_int8_skip_modules=["down_proj"]),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory: the tiny random Llama in fp32, and as transformers quantizes and saves it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2)
    root = tmp_path_factory.mktemp("bnb")
    transformers.LlamaForCausalLM(config).save_pretrained(root / "fp32")
    dirs = {"fp32": root / "fp32"}
    for name, kwargs in QUANTIZED.items():
        model = transformers.LlamaForCausalLM.from_pretrained(
            root / "fp32", quantization_config=transformers.BitsAndBytesConfig(**kwargs), device_map="cpu",
            dtype=torch.float32)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def engines(checkpoints):
    """(name, settings) -> plexus LLM, built once per module. In fp32 the 4-bit weights stay in bitsandbytes'
    plain layout; in bf16 they take its CPU kernel's layout where the CPU has AVX512-BF16."""
    cache = {}

    def get(name: str, dtype: str = "float32", **kwargs) -> LLM:
        key = (name, dtype, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = LLM(model=str(checkpoints[name]), skip_tokenizer_init=True, dtype=dtype,
                             kv_cache_space=0.02, **kwargs)
        return cache[key]
    return get


def _model(llm: LLM):
    return llm.llm_engine.executor.worker.model


def _checkpoint(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _saved_dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of the saved 4-bit weight `name` (the independent reference)."""
    state = bnbF.QuantState.from_dict({k.removeprefix(name + "."): v for k, v in tensors.items()
                                       if k.startswith(name + ".")}, device=torch.device("cpu"))
    return bnbF.dequantize_4bit(tensors[name], state).float()


def _greedy_and_prompt_logprobs(llm: LLM):
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                    prompt_logprobs=1), use_tqdm=False)[0]
    logprobs = [out.prompt_logprobs[p][PROMPT[p]].logprob for p in range(1, len(PROMPT))]
    return out.outputs[0].token_ids, torch.tensor(logprobs)


def _hf_greedy_and_prompt_logprobs(path):
    hf = transformers.LlamaForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32).eval()
    for module in hf.modules():
        # Otherwise bitsandbytes' Linear4bit runs its bf16 CPU kernel even in an fp32 model.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
        tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    return tokens, logprobs[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]


# ---------------------------------------------------------------------------------- pre-quantized


@pytest.mark.parametrize("name", ["nf4-double-quant", "fp4-skip-down_proj"])
def test_prequantized_4bit_weights_are_bitsandbytes_own_dequantization(name, checkpoints, engines):
    # In fp32 the stored state dequantizes exactly; in bf16 (bitsandbytes' CPU kernel layout, where the CPU
    # has AVX512-BF16) the block scales are rounded to bf16 (measured: at most 0.4% off).
    plain, packed = _model(engines(name)), _model(engines(name, dtype="bfloat16"))
    saved = _checkpoint(checkpoints[name])
    checked = 0
    for i in range(2):
        for fused, (block, parts) in SHARDS.items():
            if name.startswith("fp4-skip") and fused == "down_proj":
                continue
            expected = torch.cat([_saved_dequantized(saved, f"model.layers.{i}.{block}.{p}.weight") for p in parts])
            layer = getattr(getattr(plain.layers[i], block), fused)
            assert torch.equal(layer.method.dequantize(layer), expected)
            packed_layer = getattr(getattr(packed.layers[i], block), fused)
            torch.testing.assert_close(packed_layer.method.dequantize(packed_layer), expected, rtol=2 ** -7, atol=0)
            checked += 1
    assert checked == (8 if name.startswith("nf4") else 6)


def test_llm_int8_skip_modules_stay_unquantized(checkpoints, engines):
    """transformers leaves the listed modules in fp32 and, once a list is given, quantizes the lm_head."""
    model = _model(engines("fp4-skip-down_proj"))
    saved = _checkpoint(checkpoints["fp4-skip-down_proj"])
    for i, layer in enumerate(model.layers):
        assert not layer.mlp.down_proj.method.quantized and layer.mlp.gate_up_proj.method.quantized
        assert torch.equal(layer.mlp.down_proj.weight, saved[f"model.layers.{i}.mlp.down_proj.weight"])
    assert model.lm_head.method.quantized and saved["lm_head.weight"].dtype == torch.uint8


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_prequantized_greedy_matches_transformers_running_the_same_checkpoint(name, checkpoints, engines):
    tokens, logprobs = _greedy_and_prompt_logprobs(engines(name))
    hf_tokens, hf_logprobs = _hf_greedy_and_prompt_logprobs(checkpoints[name])
    assert tokens == hf_tokens
    # Both dequantize with bitsandbytes and multiply in fp32 (LLM.int8: its int8 kernels); measured
    # differences are at most 5e-7 (fp32 sums in another order), against logprobs of about -5.
    torch.testing.assert_close(logprobs, hf_logprobs, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- quantized on load


def test_quantize_on_load_is_vllms_inflight_nf4_with_double_quantization(checkpoints, engines):
    model = _model(engines("fp32", quantization="bitsandbytes", load_format="bitsandbytes"))
    original = _checkpoint(checkpoints["fp32"])
    nf4 = bnbF.get_4bit_type("nf4", device="cpu")
    nf4_widest_step = nf4.sort().values.diff().max().item()    # 0.304, between -1 and the next level
    for i in range(2):
        for fused, (block, parts) in SHARDS.items():
            layer = getattr(getattr(model.layers[i], block), fused)
            assert torch.equal(layer.bnb_quant_state.code, nf4)
            got = layer.method.dequantize(layer)
            weights = [original[f"model.layers.{i}.{block}.{p}.weight"] for p in parts]
            expected = torch.cat([bnbF.dequantize_4bit(*bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                                            quant_type="nf4")) for w in weights])
            assert torch.equal(got, expected)
            w = torch.cat(weights)
            block_absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
            error = (got - w).reshape(-1, 64).abs()
            # Half NF4's widest step of the block's absmax, plus the 8-bit rounding of that absmax.
            assert (error <= block_absmax * (nf4_widest_step / 2 + 0.01)).all()
            assert error.max() > 0
    assert not model.lm_head.method.quantized


def test_quantize_on_load_generates_as_transformers_own_nf4_checkpoint(checkpoints, engines):
    """transformers' load_in_4bit with NF4 and double quantization is the same quantization as vLLM's
    in-flight one, so the two agree token for token."""
    tokens, logprobs = _greedy_and_prompt_logprobs(engines("fp32", quantization="bitsandbytes"))
    hf_tokens, hf_logprobs = _hf_greedy_and_prompt_logprobs(checkpoints["nf4-double-quant"])
    assert tokens == hf_tokens
    torch.testing.assert_close(logprobs, hf_logprobs, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- bad input


def test_unknown_bnb_4bit_quant_type_is_refused_naming_the_setting(checkpoints, tmp_path):
    shutil.copytree(checkpoints["nf4-double-quant"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "int4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type='int4' is not supported; allowed: nf4, fp4"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, kv_cache_space=0.02)


@pytest.mark.parametrize("field, value, message", [
    ("bnb_4bit_quant_storage", "bfloat16", r"bnb_4bit_quant_storage='bfloat16' is not supported; allowed: uint8"),
    ("llm_int8_has_fp16_weight", True, r"llm_int8_has_fp16_weight=True .* not supported"),
    ("load_in_4bit", True, r"exactly one of load_in_4bit and load_in_8bit"),
])
def test_unsupported_quantization_config_fields_are_refused(field, value, message):
    qc = {"quant_method": "bitsandbytes", "load_in_8bit": field != "bnb_4bit_quant_storage",
          "load_in_4bit": field == "bnb_4bit_quant_storage", field: value}
    with pytest.raises(ValueError, match=message):
        make_quant_config("bitsandbytes", {}, qc)


def test_load_format_bitsandbytes_needs_bitsandbytes_quantization(checkpoints):
    with pytest.raises(ValueError, match=r"load_format='bitsandbytes' loads with quantization='bitsandbytes', "
                                         r"but quantization is None"):
        LLM(model=str(checkpoints["fp32"]), skip_tokenizer_init=True, load_format="bitsandbytes")


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install bitsandbytes"):
        make_quant_config("bitsandbytes", {}).linear_method("layers.0.mlp.down_proj", ["layers.0.mlp.down_proj"])
