"""gpt-oss against HF transformers on the same random weights (tests/family_parity.py): q/k/v/o biases, head_dim
from the config (64, and 40), grouped-query attention with random sink logits, sliding windows shorter than the
prompts alternating with full layers, YaRN rotary (with and without truncate), and routed experts (4 and 8,
top-1/2/4) with random router and expert biases, HF's top-k-then-softmax routing and the clamped SwiGLU (with a
limit low enough to clamp); read from the layout save_pretrained writes ([E, H, 2I], gate and up interleaved;
square in the first model, so only the declared layout reads it right) and from an MXFP4 checkpoint packed here
by the test's own packer (OCP MX: e8m0 scale per 32 values, e2m1 values), which HF itself loads dequantized
(Mxfp4Config(dequantize=True)) as the reference."""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config

from family_parity import PATHS, SCHEDULES, build, check_family, family_fixture, hf_reference, prompts
from plexus.models.quantization.mxfp4 import dequantize_mxfp4

COMMON = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
              initializer_range=0.1, sliding_window=16)


def yarn(truncate: bool) -> dict:
    return {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
            "original_max_position_embeddings": 64, "rope_theta": 150000.0}


MODELS = {
    "gptoss-4x-top1-hd64-yarn": (GptOssConfig, GptOssForCausalLM, dict(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=1,
        intermediate_size=32, rope_parameters=yarn(truncate=False))),
    "gptoss-8x-top2-hd40-gqa4to1-limit0.5-yarn-truncated": (GptOssConfig, GptOssForCausalLM, dict(
        num_hidden_layers=2, num_key_value_heads=1, head_dim=40, num_local_experts=8, num_experts_per_tok=2,
        intermediate_size=64, swiglu_limit=0.5, rope_parameters=yarn(truncate=True))),
    "gptoss-8x-top4-hd64-full-first-alpha1.2": (GptOssConfig, GptOssForCausalLM, dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=4,
        intermediate_size=32, swiglu_alpha=1.2,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
}

family = family_fixture(MODELS, COMMON)


@pytest.mark.parametrize("speed_path", list(PATHS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_gpt_oss_matches_hf_token_for_token(family, speed_path, schedule, monkeypatch):
    path, ids, expected = family
    llm = check_family(path, expected, ids, PATHS[speed_path], SCHEDULES[schedule], monkeypatch)
    assert llm.llm_engine.config.model.max_model_len == 256     # the windows cap nothing


def test_the_checkpoints_have_random_biases_sinks_and_interleaved_experts(family):
    """What the parity above reads: every bias (the router's and the experts' included) and sink is random,
    and save_pretrained wrote the experts as transformers keeps them, [E, H, 2I] and [E, I, H]."""
    path = family[0]
    config = json.loads((path / "config.json").read_text())
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    for name in ("self_attn.q_proj.bias", "self_attn.o_proj.bias", "self_attn.sinks", "mlp.router.bias",
                 "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias"):
        assert (tensors[f"model.layers.0.{name}"] != 0).all(), name
    experts, hidden, inter = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (experts, hidden, 2 * inter)
    assert tensors["model.layers.0.mlp.experts.down_proj"].shape == (experts, inter, hidden)


def _hf_model(name: str, **changes) -> GptOssForCausalLM:
    torch.manual_seed(0)
    config_cls, model_cls, extra = MODELS[name]
    model = model_cls(config_cls(vocab_size=256, **{**COMMON, **extra, **changes})).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith(("bias", "sinks")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("change", [dict(swiglu_limit=1e9), dict(swiglu_alpha=1.702)])
def test_the_clamp_and_alpha_change_the_output(change):
    """The second model's limit clamps and the third's alpha is its own, so the parity above checks both."""
    name = "gptoss-8x-top2-hd40-gqa4to1-limit0.5-yarn-truncated" if "swiglu_limit" in change \
        else "gptoss-8x-top4-hd64-full-first-alpha1.2"
    x = torch.tensor([prompts()[0]])
    with torch.no_grad():
        a = _hf_model(name)(x).logits
        b = _hf_model(name, **change)(x).logits
    assert (a - b).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------- MXFP4

def e2m1_magnitudes() -> torch.Tensor:
    """The 8 non-negative e2m1 values by code (OCP MX v1.0: 2 exponent bits with bias 1, 1 mantissa bit; code
    0-1 subnormal): [0, 0.5, 1, 1.5, 2, 3, 4, 6]."""
    values = []
    for code in range(8):
        exponent, mantissa = code >> 1, code & 1
        values.append(mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2))
    return torch.tensor(values)


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 32) as MXFP4: the shared scale of each block of 32 is 2^(floor(log2(amax)) -
    2) (2: the largest e2m1 exponent), each value rounds to the nearest e2m1 of value / scale (ties to the even
    code, beyond 6 saturating); returns (blocks uint8 [..., K/32, 16]: value 2j in the low nibble of byte j,
    2j + 1 in the high one; scales uint8 [..., K/32]: the exponent + 127; the values they stand for [..., K])."""
    grid = e2m1_magnitudes()
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    amax = blocks.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127.0))
    scaled = blocks / torch.exp2(exponent)[..., None]
    distance = (scaled.abs()[..., None] - grid).abs()
    distance = distance + (torch.arange(8) % 2) * 1e-6          # a tie goes to the even code
    magnitude = distance.argmin(dim=-1)
    codes = magnitude | ((scaled < 0).long() << 3)
    values = torch.where(scaled < 0, -grid[magnitude], grid[magnitude]) * torch.exp2(exponent)[..., None]
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8), values.reshape(w.shape)


def test_mxfp4_dequantization_follows_the_spec():
    """plexus's dequantizer on codes and scales written here: every e2m1 code in both nibbles, signs, and the
    scale's extremes (2^-127, and 2^125, whose 6 times is near the top of the float range)."""
    grid = e2m1_magnitudes()
    codes = torch.randint(0, 16, (3, 2, 32), generator=torch.Generator().manual_seed(0))
    codes[0, 0, :16], codes[0, 0, 16:] = torch.arange(16), torch.arange(16).flip(0)
    scales = torch.tensor([[127, 130], [0, 252], [100, 127]], dtype=torch.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    magnitude = grid[codes & 7] * torch.exp2(scales.double() - 127)[..., None]
    expected = torch.where(codes >= 8, -magnitude, magnitude).reshape(3, 64)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (3, 64) and torch.equal(got.double(), expected)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16), expected.to(torch.bfloat16))


def write_mxfp4_checkpoint(src, dst) -> dict[str, torch.Tensor]:
    """The checkpoint at `src` with its experts' weights in MXFP4, as openai/gpt-oss-* stores them: blocks and
    scales [E, out, in / 32, ...] (gate/up rows interleaved as transformers' columns are), quantization_config
    quant_method "mxfp4" leaving attention, router, embeddings and head out. Returns the experts' weights as
    the packed values stand for them, under transformers' names and layout."""
    dst.mkdir()
    tensors, represented = {}, {}
    for name, tensor in safetensors.torch.load_file(src / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, values = mxfp4_pack(tensor.transpose(1, 2))   # [E, out, in]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            represented[name] = values.transpose(1, 2)
        else:
            tensors[name] = tensor
    safetensors.torch.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
    return represented


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    """The second family model as an MXFP4 checkpoint, HF's model of it (dequantized by transformers' own
    mxfp4 integration) and HF's answers."""
    name = "gptoss-8x-top2-hd40-gqa4to1-limit0.5-yarn-truncated"
    config_cls, model_cls, extra = MODELS[name]
    src, dst = tmp_path_factory.mktemp("bf") / "model", tmp_path_factory.mktemp("mx") / "model"
    build(config_cls, model_cls, src, **COMMON, **extra)
    represented = write_mxfp4_checkpoint(src, dst)
    hf = GptOssForCausalLM.from_pretrained(dst, quantization_config=Mxfp4Config(dequantize=True),
                                           dtype=torch.float32).eval()
    ids = prompts()
    return dst, hf, represented, ids, hf_reference(hf, ids)


def test_hf_reads_the_packed_experts_as_the_packer_means_them(mxfp4_model):
    """The packer and transformers agree on the format (nibble order, scale bias, layout), so HF's answers are
    those of the packed weights."""
    _, hf, represented, _, _ = mxfp4_model
    for name, values in represented.items():
        assert torch.equal(hf.get_parameter(name), values), name


@pytest.mark.parametrize("speed_path,schedule", [("fused", "preemption"), ("pure-torch", "prefix-cache-chunked-16")])
def test_mxfp4_checkpoint_matches_hf_dequantizing_it(mxfp4_model, speed_path, schedule, monkeypatch):
    path, hf, _, ids, expected = mxfp4_model
    llm = check_family(path, expected, ids, PATHS[speed_path], SCHEDULES[schedule], monkeypatch)
    moe = llm.llm_engine.executor.worker.model.layers[1].mlp
    gate_up = hf.model.layers[1].mlp.experts.gate_up_proj.detach()      # [E, H, 2I], gate and up interleaved
    assert torch.equal(dequantized_experts(moe, "w13", torch.float32),
                       torch.cat((gate_up[..., 0::2], gate_up[..., 1::2]), dim=-1).transpose(1, 2))
    assert torch.equal(dequantized_experts(moe, "w2", torch.float32),
                       hf.model.layers[1].mlp.experts.down_proj.detach().transpose(1, 2))


def dequantized_experts(moe, name: str, dtype: torch.dtype) -> torch.Tensor:
    w = dict(zip(("w13", "w2"), moe._experts()))[name]
    return torch.stack([w.dequantized_expert(e, dtype) for e in range(moe.num_experts)])


def test_mxfp4_experts_are_kept_as_exact_int8_blocks(mxfp4_model):
    """A real checkpoint runs in bf16: the experts are then one byte a weight (twice each e2m1 value, a scale
    per block of 32), value for value HF's bf16 experts, and run on the integer experts kernel."""
    from plexus import LLM, SamplingParams

    path = mxfp4_model[0]
    hf = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                           dtype=torch.bfloat16)
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="bfloat16", kv_cache_space=0.02)
    moe = llm.llm_engine.executor.worker.model.layers[0].mlp
    gate_up = hf.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert moe.w13 is None and moe.w13_qweight.dtype == torch.int8 and moe.w13_scales.dtype == torch.float32
    assert moe.w13_qweight.abs().max() <= 12 and moe.w13_scales.shape[-1] == moe.w13_qweight.shape[-1] // 32
    assert torch.equal(dequantized_experts(moe, "w13", torch.bfloat16),
                       torch.cat((gate_up[..., 0::2], gate_up[..., 1::2]), dim=-1).transpose(1, 2))
    assert torch.equal(dequantized_experts(moe, "w2", torch.bfloat16),
                       hf.model.layers[0].mlp.experts.down_proj.detach().transpose(1, 2))
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_mxfp4_is_refused_for_an_unquantized_checkpoint(family):
    from plexus import LLM

    with pytest.raises(ValueError, match="quantization='mxfp4' runs checkpoints whose experts are stored in MXFP4"):
        LLM(model=str(family[0]), skip_tokenizer_init=True, kv_cache_space=0.02, quantization="mxfp4")


def test_config_json_without_architectures_runs_as_gpt_oss(family, tmp_path, monkeypatch):
    """model_type "gpt_oss" alone picks the class."""
    path, ids, expected = family
    for item in path.iterdir():
        shutil.copy(item, tmp_path / item.name)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_family(tmp_path, expected, ids, PATHS["fused"], SCHEDULES["preemption"], monkeypatch)


def test_a_truncated_mxfp4_tensor_is_named(mxfp4_model, tmp_path):
    from plexus import LLM

    path = mxfp4_model[0]
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][:, :-1].contiguous()      # a row short
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"'layers.0.mlp.experts.down_proj_blocks' .* are not MXFP4"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, kv_cache_space=0.02)
