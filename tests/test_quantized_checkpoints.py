"""Quantized checkpoints made by each format's own writer (llm-compressor / compressed-tensors, GPTQModel,
AutoAWQ, bitsandbytes, and LLMC's and vLLM-FP8's documented layouts), committed as small fixtures under
tests/fixtures/quantized/ together with the scripts that made them (make/). Each fixture carries
reference.safetensors: the writer's own dequantization of every quantized weight.

For each: plexus loads it without being told the method, every dequantized weight equals the writer's to
within rounding, and greedy decoding in fp32 matches HF transformers running the writer's dequantized weights
(weight-only schemes token for token; schemes that also quantize activations within measured bounds)."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from plexus import LLM, SamplingParams
from plexus.models.layers.linear import LinearLayer

ROOT = pathlib.Path(__file__).parent / "fixtures" / "quantized"
FIXTURES = sorted(p.name for p in ROOT.iterdir() if (p / "reference.safetensors").is_file())
PROMPTS = [[1, 17, 42, 99, 3, 250, 7, 64], [200, 5, 5, 81, 130, 2, 9]]
NEW_TOKENS = 16


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _activation_quantized(layer: LinearLayer) -> bool:
    return bool(getattr(layer.method, "activations", None) or getattr(layer.method, "static_activations", False))


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    path = ROOT / request.param
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=128, kv_cache_space=0.01)
    model = llm.llm_engine.executor.worker.model
    return path, llm, model


def test_every_dequantized_weight_equals_the_writers(fixture):
    path, llm, model = fixture
    reference = _tensors(path / "reference.safetensors")
    checked = set()
    for prefix, layer in model.named_modules():
        if not isinstance(layer, LinearLayer):
            continue
        parent, _, name = prefix.rpartition(".")
        shards = [f"model.{parent}.{s}.weight" if parent else f"{s}.weight"
                  for s in model.packed_modules_mapping.get(name, (name,))]
        if not layer.method.quantized:
            assert not any(s in reference for s in shards), f"{prefix}: the writer quantized it, plexus did not"
            continue
        assert all(s in reference for s in shards), f"{prefix}: plexus quantized it, the writer did not"
        expected = torch.cat([reference[s].float() for s in shards])
        actual = layer.method.dequantize(layer).float()
        # Within rounding: both are q * scale (minus zero points) in fp32 from the same stored values.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{prefix}: {m}")
        checked.update(shards)
    assert checked == set(reference), f"reference weights never compared: {sorted(set(reference) - checked)}"


def _hf_reference(path: pathlib.Path) -> LlamaForCausalLM:
    """transformers' Llama with the writer's dequantized weights and the checkpoint's other tensors."""
    raw = json.loads((path / "config.json").read_text())
    for key in ("quantization_config", "compression_config"):
        raw.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**raw)).float().eval()
    state = model.state_dict()
    tensors = {**{k: v for k, v in _tensors(path / "model.safetensors").items() if k in state},
               **_tensors(path / "reference.safetensors")}
    missing = set(state) - set(tensors) - {k for k in state if "rotary" in k}
    assert not missing, f"no reference for {sorted(missing)[:3]}"
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return model


def test_greedy_decoding_matches_hf_on_the_writers_weights(fixture):
    path, llm, model = fixture
    hf = _hf_reference(path)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    activation_quantized = any(_activation_quantized(m) for m in model.modules() if isinstance(m, LinearLayer))
    for prompt, output in zip(PROMPTS, outputs):
        ours = list(output.outputs[0].token_ids)
        # HF's log-probabilities along plexus's tokens (teacher-forced), against plexus's own.
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        chosen = logits.gather(1, torch.tensor(ours)[:, None])[:, 0]
        margin = logits.max(dim=1).values - chosen          # 0 where plexus picked HF's argmax
        logprob_error = (chosen - torch.tensor([lp[t].logprob for t, lp in zip(ours, output.outputs[0].logprobs)]))
        if activation_quantized:
            # Activations rounded to 8 bits as well: plexus's tokens stay near HF's best.
            assert margin.max() < 0.5 and logprob_error.abs().max() < 0.5, (margin, logprob_error)
        else:
            # Weight-only: the same model up to fp32 rounding; a token may differ only at an exact tie.
            assert margin.max() < 1e-4 and logprob_error.abs().max() < 1e-4, (margin, logprob_error)
