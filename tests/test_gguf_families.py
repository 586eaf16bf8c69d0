"""GGUF files of every family plexus converts beyond Llama and Qwen2: Qwen3, Phi-3, Gemma 2, Gemma 3, Mixtral
(architecture "llama" with expert tensors, also with q/k/v fused by --fuse-qkv) and Qwen3-MoE, written by
llama.cpp's own converter from tiny random HF models (tests/fixtures/make_family_ggufs.py, committed under
tests/fixtures/gguf/). The truth is HF transformers on the same model rebuilt here from its seed and config:

- the converted directory holds that checkpoint: the same tensor names, the same values (Gemma's norms,
  stored as w + 1, within float32 rounding), and every config setting the HF model reads;
- plexus on the f32 file gives HF's greedy tokens and its prompt logprobs within 1e-4;
- a Q8_0 file run dequantized matches HF on the same weights rounded through Q8_0 (gguf-py's own quantizer,
  which llama.cpp's converter calls), and run as stored (quantization="gguf": dense linear layers keep their
  blocks, MoE experts are dequantized) stays within a measured bound of that dequantized run.
"""
from __future__ import annotations

import json
import pathlib

import pytest
import safetensors.torch
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from family_parity import MAX_TOKENS, PATHS, SCHEDULES, check_family, hf_reference, prompts
from fixtures.make_family_ggufs import FAMILIES, build_hf
from plexus import LLM, SamplingParams
from plexus.model_files.gguf import convert_gguf
from plexus.models.layers.moe import FusedMoE

F32 = [name for name, family in FAMILIES.items() if "f32" in family.types]
FILES = [(name, outtype) for name, family in FAMILIES.items() for outtype in family.types]
Q8_0 = [name for name, family in FAMILIES.items() if "q8_0" in family.types]
SCHEDULE = SCHEDULES["prefix-cache-chunked-16"]
# LongRoPE's short factor is the one HF uses for these prompts (shorter than original_max_position_embeddings);
# a context capped there is where plexus uses it too (beyond, its table switches to the long factor).
LLM_KWARGS = {"phi3-longrope": dict(max_model_len=128)}

# Gemma's norms come back as fl(w + 1) - 1: exact to half a float32 ulp of 1.
NORM_OFFSET_ERROR = 2.0 ** -24
# Settings of the HF config that no model reads, or that the GGUF file does not carry.
NOT_MODEL_SETTINGS = {"_name_or_path", "architectures", "transformers_version", "dtype", "initializer_range",
                      "id2label", "label2id", "return_dict", "output_attentions", "output_hidden_states",
                      "chunk_size_feed_forward", "is_encoder_decoder"}
# quantization="gguf" against the dequantized run of the same Q8_0 file, both fp32: the stored blocks
# dequantize to the very values the dequantized directory holds. Measured worst prompt-logprob difference:
# 0.0 (qwen3, phi3 and mixtral, CPU); the bound leaves room for a kernel that sums in another order.
AS_STORED_BOUND = 1e-5


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """name -> (HF model rebuilt from the fixture's seed, its saved checkpoint tensors)."""
    built = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(f"hf-{name}")
        model = build_hf(name, path)
        built[name] = model, safetensors.torch.load_file(path / "model.safetensors")
    return built


def q8_0_round_trip(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What a Q8_0 file written by llama.cpp's converter holds for a checkpoint tensor: every matrix except a
    MoE router (`*.gate.weight`, which the converter keeps in F32) quantized by gguf-py along its rows."""
    if tensor.dim() < 2 or name.endswith(".gate.weight"):
        return tensor
    blocks = gguf_quants.quantize(tensor.numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf_quants.dequantize(blocks, GGMLQuantizationType.Q8_0).copy())


@pytest.mark.parametrize("name,outtype", FILES, ids=[f"{n}-{t}" for n, t in FILES])
def test_converted_directory_is_the_hf_checkpoint_the_file_was_made_from(name, outtype, hf_checkpoints, tmp_path):
    model, checkpoint = hf_checkpoints[name]
    converted = convert_gguf(FAMILIES[name].file(name, outtype), cache_root=tmp_path)
    weights = safetensors.torch.load_file(converted / "model.safetensors")
    assert sorted(weights) == sorted(checkpoint)
    for tensor_name, expected in checkpoint.items():
        if outtype == "q8_0":
            expected = q8_0_round_trip(tensor_name, expected)
        error = (weights[tensor_name] - expected).abs().max().item()
        allowed = NORM_OFFSET_ERROR if name.startswith("gemma") and tensor_name.endswith("norm.weight") else 0.0
        assert error <= allowed, (f"{tensor_name}: {error} (if every tensor is off, transformers now builds these "
                                  "models differently from the seed: rerun tests/fixtures/make_family_ggufs.py)")

    config = json.loads((converted / "config.json").read_text())
    expected_config = model.config.to_dict()
    for key in sorted(set(expected_config) - NOT_MODEL_SETTINGS):
        assert config.get(key) == expected_config[key], key
    assert config["architectures"] == [type(model).__name__]


@pytest.mark.parametrize("name", F32)
def test_f32_file_matches_hf_token_for_token(name, hf_checkpoints, monkeypatch):
    ids = prompts()
    expected = hf_reference(hf_checkpoints[name][0], ids)
    check_family(FAMILIES[name].file(name, "f32"), expected, ids, PATHS["fused"], SCHEDULE, monkeypatch,
                 **LLM_KWARGS.get(name, {}))


@pytest.fixture(scope="module")
def q8_0_references(hf_checkpoints, tmp_path_factory):
    """name -> HF's greedy tokens and prompt logprobs on the family's weights rounded through Q8_0."""
    ids = prompts()
    references = {}
    for name in Q8_0:
        model, checkpoint = hf_checkpoints[name]
        path = tmp_path_factory.mktemp(f"hf-{name}-q8_0")
        model.config.save_pretrained(path)
        safetensors.torch.save_file({k: q8_0_round_trip(k, v) for k, v in checkpoint.items()},
                                    path / "model.safetensors", metadata={"format": "pt"})
        rounded = type(model).from_pretrained(path, dtype=torch.float32).eval()
        references[name] = hf_reference(rounded, ids)
    return ids, references


@pytest.mark.parametrize("name", Q8_0)
def test_q8_0_file_dequantized_matches_hf_on_q8_0_rounded_weights(name, q8_0_references, monkeypatch):
    ids, references = q8_0_references
    check_family(FAMILIES[name].file(name, "q8_0"), references[name], ids, PATHS["fused"], SCHEDULE, monkeypatch)


@pytest.mark.parametrize("name", Q8_0)
def test_q8_0_file_runs_as_stored_within_bound_of_its_dequantized_run(name, q8_0_references):
    ids, _ = q8_0_references
    path = str(FAMILIES[name].file(name, "q8_0"))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=1, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in ids]
    runs = {}
    for quantization in (None, "gguf"):
        llm = LLM(model=path, quantization=quantization, dtype="float32", skip_tokenizer_init=True,
                  kv_cache_space=0.02, **SCHEDULE)
        runs[quantization] = llm.generate(inputs, params, use_tqdm=False)
        if quantization == "gguf":
            model = llm.llm_engine.executor.worker.model
            moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
            routers = {id(m.gate) for m in moe}
            dense = [layer for layer in model.linear_layers() if id(layer) not in routers]
            assert dense and all(layer.method.quantized for layer in dense)
            # The experts run dequantized, as plain float32 weights.
            assert all(m.w13.dtype == m.w2.dtype == torch.float32 for m in moe)
            assert bool(moe) == (name == "mixtral")
        del llm
    worst = 0.0
    for p, stored, dequantized in zip(ids, runs["gguf"], runs[None]):
        assert stored.outputs[0].token_ids == dequantized.outputs[0].token_ids
        worst = max(worst, max(abs(stored.prompt_logprobs[i][p[i]].logprob
                                   - dequantized.prompt_logprobs[i][p[i]].logprob) for i in range(1, len(p))))
    assert worst < AS_STORED_BOUND, worst
    print(f"{name}: as stored vs dequantized, worst prompt logprob difference {worst:.2e}")


def test_every_fixture_is_small():
    sizes = {path.name: path.stat().st_size for path in (pathlib.Path(__file__).parent / "fixtures" / "gguf").iterdir()}
    assert sorted(sizes) == sorted(FAMILIES[n].file(n, t).name for n, t in FILES)
    assert max(sizes.values()) < 2 * 1024**2 and sum(sizes.values()) < 10 * 1024**2, sizes
