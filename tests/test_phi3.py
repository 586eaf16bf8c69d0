"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (Phi3ForCausalLM) against HF transformers on the same random weights
(tests/family_parity.py): checkpoints that store q/k/v and gate/up fused, full and partial rotary embeddings,
LongRoPE, a sliding window shorter than the prompts; a PEFT adapter on the fused modules against PEFT; and
AWQ / GPTQ checkpoints whose fused layers are stored whole, made from the writers' fixtures.

LongRoPE: one factor serves the whole context, as in vLLM: the long one when max_model_len passes
original_max_position_embeddings, else the short one; HF picks per forward (long once the sequence passes the
boundary). So prompts past the boundary are held to HF with the default context, and short prompts to HF with
max_model_len at the boundary."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Phi3Config, Phi3ForCausalLM

from family_parity import MAX_TOKENS, PATHS, SCHEDULES, VOCAB, build, check_family, hf_reference, prompts
from plexus import LLM, SamplingParams
from plexus.lora.request import LoRARequest
from plexus.models.layers.linear import LinearLayer
from plexus.models.layers.recipe import LLAMA_RECIPE

COMMON = dict(intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ORIGINAL = 32       # original_max_position_embeddings of the LongRoPE models: prompts of 37..76 tokens cross it


def _factors(count: int, seed: int) -> list[float]:
    return (1 + 3 * torch.rand(count, generator=torch.Generator().manual_seed(seed))).tolist()


def _longrope(rotary_dims: int) -> dict:
    return dict(original_max_position_embeddings=ORIGINAL, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=ORIGINAL,
        short_factor=_factors(rotary_dims // 2, 5), long_factor=_factors(rotary_dims // 2, 6)))


MODELS = {
    "gqa2to1-hd16-untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=False),
    "partial-0.5-hd32-tied": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  partial_rotary_factor=0.5, tie_word_embeddings=True),
    "partial-0.5-hd24-tied": dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=1,
                                  partial_rotary_factor=0.5, tie_word_embeddings=True),
    "sliding-16": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                       tie_word_embeddings=False),
    # Phi-3.5-mini's kind: a window no shorter than the context, which excludes nothing.
    "window-256-of-256": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=256,
                              tie_word_embeddings=False),
}
LONGROPE_MODELS = {
    "longrope-hd16-untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False, **_longrope(16)),
    # Phi-4-mini's shape: LongRoPE over the first 3/4 of each head, tied embeddings.
    "longrope-partial-0.75-hd32-tied": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                                            partial_rotary_factor=0.75, tie_word_embeddings=True, **_longrope(24)),
}


def _short_prompts() -> list[list[int]]:
    """Prompts whose whole generation fits in ORIGINAL tokens (at most 26 + MAX_TOKENS), without
    token 0: HF's generate takes it for padding (pad_token_id=0) and masks it out."""
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(1, VOCAB, (16,), generator=g).tolist()
    return [prefix + torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (2, 6, 10)]


# --- parity ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(MODELS))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build(Phi3Config, Phi3ForCausalLM, path, **COMMON, **MODELS[request.param])
    ids = prompts()
    return request.param, path, ids, hf_reference(hf, ids)


@pytest.fixture(scope="module", params=list(LONGROPE_MODELS))
def longrope(request, tmp_path_factory):
    """The model, with HF's greedy continuations of prompts past the boundary and of prompts that stay below."""
    path = tmp_path_factory.mktemp(request.param)
    hf = build(Phi3Config, Phi3ForCausalLM, path, **COMMON, **LONGROPE_MODELS[request.param])
    crossing, short = prompts(), _short_prompts()
    return path, crossing, hf_reference(hf, crossing), short, hf_reference(hf, short)


@pytest.mark.parametrize("speed_path", list(PATHS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_phi3_matches_hf_token_for_token(family, speed_path, schedule, monkeypatch):
    name, path, ids, expected = family
    llm = check_family(path, expected, ids, PATHS[speed_path], SCHEDULES[schedule], monkeypatch)
    assert llm.llm_engine.config.model.max_model_len == 256     # the window caps nothing
    recipe = llm.llm_engine.executor.worker.model.decode_recipe
    partial, sliding = name.startswith("partial"), name.startswith("sliding")
    assert (recipe.position == "partial-rope") == partial and (recipe.attention == "sliding") == sliding
    if not partial and not sliding:
        assert recipe == LLAMA_RECIPE
    if speed_path == "fused":   # every Phi-3 recipe (partial rotary and windows included) is the fused step's own
        model = llm.llm_engine.executor.worker.model
        assert any(plan is not None for plan in model.ops._decode_weights_of.values())


@pytest.mark.parametrize("speed_path", list(PATHS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_longrope_matches_hf_on_either_side_of_the_boundary(longrope, speed_path, schedule, monkeypatch):
    """Past original_max_position_embeddings with the model's whole context (the long factor), and below it
    with max_model_len at the boundary (the short factor)."""
    path, crossing, crossing_expected, short, short_expected = longrope
    assert max(len(p) for p in short) + MAX_TOKENS <= ORIGINAL < min(len(p) for p in crossing)
    check_family(path, crossing_expected, crossing, PATHS[speed_path], SCHEDULES[schedule], monkeypatch)
    check_family(path, short_expected, short, PATHS[speed_path], SCHEDULES[schedule], monkeypatch,
                 max_model_len=ORIGINAL)


# --- LoRA on the fused modules ---------------------------------------------------------------------------

LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_a_peft_adapter_on_the_fused_modules_matches_peft(tmp_path):
    """PEFT trains Phi-3's qkv_proj and gate_up_proj whole (lora_B [q + 2 kv, r], [2 I, r]); served beside
    base-only requests in one batch."""
    base = build(Phi3Config, Phi3ForCausalLM, tmp_path / "base", **COMMON, **MODELS["gqa2to1-hd16-untied"])
    torch.manual_seed(7)
    peft = get_peft_model(Phi3ForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft.save_pretrained(tmp_path / "adapter")
    saved = safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt")
    assert saved.get_slice("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight").get_shape() == [128, 8]

    ids = prompts(count=4)
    which = [True, False, True, False]
    model = PeftModel.from_pretrained(Phi3ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    want = []
    for prompt, adapted in zip(ids, which):
        with torch.no_grad():
            x = torch.tensor([prompt])
            if adapted:
                out = model.generate(x, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
                logits = model(x).logits[0]
            else:
                with model.disable_adapter():
                    out = model.generate(x, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)
                    logits = model(x).logits[0]
        want.append((out[0, len(prompt):].tolist(), torch.log_softmax(logits.float(), dim=-1)))
    base_tokens = [greedy for greedy, _ in hf_reference(base, ids)]
    assert want[0][0] != base_tokens[0] and want[2][0] != base_tokens[2]     # the adapter changes the output

    llm = LLM(model=str(tmp_path / "base"), skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.02,
              enable_lora=True, max_loras=1, max_lora_rank=8)
    request = LoRARequest("phi3-fused", 1, str(tmp_path / "adapter"))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params,
                           lora_request=[request if a else None for a in which], use_tqdm=False)
    for prompt, out, (greedy, logprobs) in zip(ids, outputs, want):
        assert out.outputs[0].token_ids == greedy
        errors = [abs(out.prompt_logprobs[k][prompt[k]].logprob - logprobs[k - 1, prompt[k]].item())
                  for k in range(1, len(prompt))]
        assert max(errors) < 1e-4, max(errors)


# --- quantized checkpoints with whole fused layers ---------------------------------------------------------

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "quantized"
FUSED = {"qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]), "gate_up_proj": ("mlp", ["gate_proj", "up_proj"])}


def _read(path: pathlib.Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _fuse(tensors: dict[str, torch.Tensor], layers: int, out_dim: int) -> dict[str, torch.Tensor]:
    """A Llama checkpoint's separate q/k/v and gate/up tensors as Phi-3 stores them: one tensor per fused
    module, the shards' outputs concatenated (along out_dim: 1 for AWQ's and GPTQ's [in or groups, out]
    tensors, 0 for compressed-tensors' [out, ...]; 0 for the reference's [out, in] weights); a g_idx the shards
    share, once; compressed-tensors' weight_shape [out, in] of the whole."""
    out = dict(tensors)
    for i in range(layers):
        for fused, (parent, shards) in FUSED.items():
            prefix = f"model.layers.{i}.{parent}"
            for suffix in {n.rpartition(".")[2] for n in tensors if n.startswith(f"{prefix}.{shards[0]}.")}:
                parts = [out.pop(f"{prefix}.{s}.{suffix}") for s in shards]
                if suffix == "g_idx":
                    assert all(torch.equal(p, parts[0]) for p in parts)
                    fused_tensor = parts[0]
                elif suffix == "weight_shape":
                    fused_tensor = torch.tensor([sum(int(p[0]) for p in parts), int(parts[0][1])], dtype=parts[0].dtype)
                else:
                    fused_tensor = torch.cat(parts, dim=0 if suffix == "weight" else out_dim)
                out[f"{prefix}.{fused}.{suffix}"] = fused_tensor
    return out


def _phi3_from_fixture(name: str, directory: pathlib.Path) -> tuple[pathlib.Path, dict[str, torch.Tensor]]:
    """The writer's quantized tiny Llama as a Phi-3 checkpoint (fused modules stored whole), and the writer's
    dequantized weights fused the same way."""
    source = FIXTURES / name
    raw = json.loads((source / "config.json").read_text())
    config = Phi3Config(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"], max_position_embeddings=raw["max_position_embeddings"],
        rms_norm_eps=raw["rms_norm_eps"], tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters=dict(rope_type="default", rope_theta=(raw.get("rope_parameters") or raw)["rope_theta"]))
    config.architectures = ["Phi3ForCausalLM"]
    config.quantization_config = raw["quantization_config"]
    directory.mkdir()
    config.save_pretrained(directory)
    layers = raw["num_hidden_layers"]
    out_dim = 1 if raw["quantization_config"]["quant_method"] in ("awq", "gptq") else 0
    save_file(_fuse(_read(source / "model.safetensors"), layers, out_dim), str(directory / "model.safetensors"))
    return directory, _fuse(_read(source / "reference.safetensors"), layers, 0)


@pytest.mark.parametrize("name", ["awq-gemm-4bit-g64", "gptq-4bit-g64-asym"])
def test_awq_and_gptq_checkpoints_with_whole_fused_layers_match_hf_on_the_writers_weights(name, tmp_path):
    path, reference = _phi3_from_fixture(name, tmp_path / "phi3")
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=128, kv_cache_space=0.01)
    model = llm.llm_engine.executor.worker.model
    for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        layer = model.get_submodule(f"layers.0.{module}")
        assert layer.method.quantized
        torch.testing.assert_close(layer.method.dequantize(layer).float(),
                                   reference[f"model.layers.0.{module}.weight"].float(), rtol=1e-5, atol=1e-6)

    hf = Phi3ForCausalLM(Phi3Config.from_pretrained(path)).double().eval()
    stored = {k: v for k, v in _read(path / "model.safetensors").items() if k in hf.state_dict()}
    hf.load_state_dict({k: v.double() for k, v in {**stored, **reference}.items()}, strict=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    for prompt in prompts(count=2, shared=8):
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        ours = list(out.token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        chosen = logits.gather(1, torch.tensor(ours)[:, None])[:, 0]
        # The same weights up to fp32 rounding: plexus's tokens are HF's argmax, at HF's log-probabilities.
        assert (logits.max(dim=1).values - chosen).max() < 1e-4
        ours_logprobs = torch.tensor([lp[t].logprob for t, lp in zip(ours, out.logprobs)], dtype=torch.float64)
        assert (chosen - ours_logprobs).abs().max() < 1e-4


@pytest.mark.parametrize("name, refused", [
    ("ct-w4a16-g64", r"weight_shape' holds the whole fused layer .* PackedLinearMethod loads it only shard by shard"),
    ("fp8-block", r"weight_scale_inv' of shape \(4, 1\) holds the whole fused layer .* Fp8LinearMethod keeps "
                  r"'weight_scale_inv' per shard, \(2, 1\) each, and cannot split it")])
def test_a_whole_fused_tensor_a_method_keeps_only_per_shard_is_refused_by_name(name, refused, tmp_path):
    """compressed-tensors checks weight_shape shard by shard; fp8's block scales start a block at each shard's
    first row: whole fused ones are refused, the tensor and the method named."""
    path, _ = _phi3_from_fixture(name, tmp_path / "phi3")
    with pytest.raises(ValueError, match=r"'layers\.0\.(self_attn\.qkv|mlp\.gate_up)_proj\." + refused):
        LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=128, kv_cache_space=0.01)


@pytest.mark.parametrize("parallel", [None, "column", "row"])
def test_a_whole_fused_tensor_loads_as_its_shards_would_on_every_tensor_parallel_rank(parallel):
    """Each rank of a [q, k, v] layer loaded from one [q + 2 kv, in] tensor computes its own part: q, k and v
    each narrowed to the rank's rows (column), or every row over the rank's inputs (row)."""
    sizes, k = [8, 4, 4], 12
    g = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(sum(sizes), k, generator=g), torch.randn(sum(sizes), generator=g), torch.randn(3, k)
    tp = 1 if parallel is None else 2
    outputs = []
    for rank in range(tp):
        layer = LinearLayer(k, sizes, bias=True, parallel=parallel, tp_rank=rank, tp_size=tp)
        layer.load_weight("weight", weight, source="qkv_proj.weight")
        layer.load_weight("bias", bias, source="qkv_proj.bias")
        assert layer.missing_weights() == []
        inputs = x if parallel != "row" else x[:, rank * k // tp:(rank + 1) * k // tp]
        outputs.append(layer(inputs))
    if parallel == "column":      # the rank's rows of each shard, in shard order
        rows = [torch.cat([torch.arange(o + r * n // tp, o + (r + 1) * n // tp)
                           for o, n in zip([0, 8, 12], sizes)]) for r in range(tp)]
        expected = [F.linear(x, weight[r], bias[r]) for r in rows]
    elif parallel == "row":       # partial sums; the bias on rank 0 only
        expected = [F.linear(x[:, :6], weight[:, :6], bias), F.linear(x[:, 6:], weight[:, 6:])]
    else:
        expected = [F.linear(x, weight, bias)]
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want)
