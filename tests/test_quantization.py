"""quantization="neuron_quant": Neuron's per-channel s8 / f8e4m3fn weight quantization, run by plexus
itself, held to measured bounds against the unquantized fp32 model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plexus import LLM, SamplingParams
from plexus.models.layers.attention import AttentionMetadata
from plexus.models.quantization import make_quant_config
from plexus.models.layers.linear import LinearLayer
from plexus.models.quantization.neuron_quant import (
    INT8PACK_MAX_ROWS, NeuronQuantConfig, NeuronQuantLinearMethod, dequantize, quantize_weight)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
]
CONTINUATION = 64


def NeuronQuantLinear(linear: nn.Linear, quant_dtype: str) -> LinearLayer:
    """A LinearLayer with the neuron_quant method, loaded from `linear` as from a checkpoint."""
    layer = LinearLayer(linear.in_features, [linear.out_features], linear.bias is not None,
                        method=NeuronQuantLinearMethod(quant_dtype), dtype=linear.weight.dtype)
    layer.load_weight("weight", linear.weight.detach())
    if linear.bias is not None:
        layer.load_weight("bias", linear.bias.detach())
    layer.method.process_weights_after_loading(layer)
    return layer


def _random_weight(rows: int = 96, cols: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, as in real checkpoints: a per-tensor scale would lose the small ones.
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]


@pytest.mark.parametrize("quant_dtype, storage, qmax, max_rel_error", [
    ("s8", torch.int8, 127.0, 0.5 / 127),           # half a step of absmax / 127
    ("f8e4m3fn", torch.float8_e4m3fn, 240.0, 1 / 16),  # half an ulp of a 3-bit mantissa
])
def test_quantize_round_trip_is_within_half_a_step_per_row(quant_dtype, storage, qmax, max_rel_error):
    w = _random_weight()
    q, scale = quantize_weight(w, quant_dtype)
    absmax = w.abs().amax(dim=1)
    assert q.dtype == storage and q.shape == w.shape and scale.shape == (w.shape[0],)
    torch.testing.assert_close(scale, absmax / qmax)
    assert q.float().abs().amax(dim=1).eq(qmax).all()   # each row's largest weight lands on the top code
    error = (dequantize(q, scale, torch.float32) - w).abs()
    if quant_dtype == "s8":
        assert q.min() >= -127 and q.max() <= 127
        assert (error <= scale[:, None] * 0.5 * 1.0001).all()
    else:
        assert (error <= w.abs() * max_rel_error + scale[:, None] * 2 ** -9).all()   # relative, down to subnormals
    assert (error.amax(dim=1) / absmax).max() <= max_rel_error * 1.0001


def test_all_zero_rows_quantize_to_zero():
    w = _random_weight(4, 32)
    w[1] = 0
    for quant_dtype in ("s8", "f8e4m3fn"):
        q, scale = quantize_weight(w, quant_dtype)
        assert scale[1] == 0 and q[1].float().eq(0).all() and torch.isfinite(q.float()).all()


@pytest.mark.parametrize("bias", [False, True])
def test_int8pack_path_matches_the_dequantize_then_matmul_path(bias):
    """Few rows take torch's int8 x bf16 kernel, many the cast-and-F.linear path: the same rows agree."""
    linear = nn.Linear(256, 96, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_random_weight())
    layer = NeuronQuantLinear(linear.to(torch.bfloat16), "s8")
    x = torch.randn(4 * INT8PACK_MAX_ROWS, 256, dtype=torch.bfloat16)
    few = layer(x[:INT8PACK_MAX_ROWS])    # int8pack
    many = layer(x)[:INT8PACK_MAX_ROWS]   # cast and F.linear
    ref = F.linear(x[:INT8PACK_MAX_ROWS].float(), dequantize(layer.weight, layer.weight_scale, torch.float32),
                   None if layer.bias is None else layer.bias.float())
    torch.testing.assert_close(few.float(), many.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    torch.testing.assert_close(few.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("quant_dtype, rows", [("s8", 4), ("s8", 32), ("f8e4m3fn", 4)])
def test_quantized_layer_compiles_with_static_shapes(quant_dtype, rows):
    """The reference backend traces the model with torch.compile(dynamic=False)."""
    layer = NeuronQuantLinear(nn.Linear(256, 96, bias=True).to(torch.bfloat16), quant_dtype)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
        eager = layer(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=1e-2)


def test_only_the_decoder_layers_matmuls_are_quantized():
    """As in transformers-neuronx: attention qkv/o and the MLP; the embeddings and an untied lm_head stay."""
    from transformers import Qwen2Config

    from plexus.models.layers.attention import TorchPagedAttention
    from plexus.models.qwen2 import Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg, TorchPagedAttention, 64, quant_config=NeuronQuantConfig()).to(torch.bfloat16)
    quantized = {name for name, m in model.named_modules() if isinstance(m, LinearLayer) and m.method.quantized}
    assert quantized == {f"layers.{i}.{proj}" for i in range(2) for proj in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert not model.lm_head.method.quantized and model.lm_head.weight.dtype == torch.bfloat16
    assert model.layers[0].self_attn.qkv_proj.bias.dtype == torch.bfloat16   # qwen2's qkv bias
    assert model.quant_config == NeuronQuantConfig("s8")


def test_quant_dtype_comes_from_neuron_quant_dtype():
    assert make_quant_config("neuron_quant", {}) == NeuronQuantConfig("s8")
    assert make_quant_config("neuron_quant", {"NEURON_QUANT_DTYPE": "f8e4m3fn"}) == NeuronQuantConfig("f8e4m3fn")
    with pytest.raises(ValueError, match="known: neuron_quant, int8, w8a8, fp8, awq, gptq"):
        make_quant_config("marlin", {})


def test_bad_neuron_quant_dtype_names_the_variable_and_the_allowed_values(monkeypatch):
    monkeypatch.setenv("NEURON_QUANT_DTYPE", "int4")
    with pytest.raises(ValueError, match=r"NEURON_QUANT_DTYPE='int4'.*allowed: s8, f8e4m3fn"):
        LLM(quantization="neuron_quant")


@pytest.fixture(scope="module")
def quantized():
    """Quantized engines by (dtype, NEURON_QUANT_DTYPE or None for unset), built once for the module."""
    engines: dict[tuple[str, str | None], LLM] = {}

    def get(dtype: str, quant_dtype: str | None) -> LLM:
        if (dtype, quant_dtype) not in engines:
            with pytest.MonkeyPatch.context() as mp:
                if quant_dtype is None:
                    mp.delenv("NEURON_QUANT_DTYPE", raising=False)
                else:
                    mp.setenv("NEURON_QUANT_DTYPE", quant_dtype)
                engines[dtype, quant_dtype] = LLM(dtype=dtype, quantization="neuron_quant", max_model_len=1024,
                                                  kv_cache_space=0.05)
        return engines[dtype, quant_dtype]

    return get


@pytest.fixture(scope="module")
def forced_tokens(llm_fp32):
    """Each prompt and the fp32 model's greedy continuation: the positions every model is scored on."""
    outputs = llm_fp32.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=CONTINUATION, ignore_eos=True),
                                use_tqdm=False)
    return [o.prompt_token_ids + list(o.outputs[0].token_ids) for o in outputs]


def _score(llm: LLM, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per teacher-forced position: the model's top-1 token and the logprob of the forced token."""
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences],
                           SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    top1, forced = [], []
    for seq, out in zip(sequences, outputs):
        for pos in range(1, len(seq)):
            entry = out.prompt_logprobs[pos]
            top1.append(next(token for token, lp in entry.items() if lp.rank == 1))
            forced.append(entry[seq[pos]].logprob)
    return torch.tensor(top1), torch.tensor(forced)


@pytest.fixture(scope="module")
def fp32_scores(llm_fp32, forced_tokens):
    return _score(llm_fp32, forced_tokens)


def _logits(llm: LLM, sequences: list[list[int]]) -> torch.Tensor:
    """Full-vocab fp32 logits at every teacher-forced position, straight from the engine's model."""
    engine = llm.llm_engine
    worker, block_size = engine.executor.worker, engine.config.cache.block_size
    rows = []
    with torch.inference_mode():
        for seq in sequences:
            meta = AttentionMetadata.build([len(seq)], [len(seq)], [list(range(-(-len(seq) // block_size)))],
                                           block_size, torch.device("cpu"))
            hidden = worker.model(torch.tensor(seq), meta.positions, worker.kv_caches, meta)
            rows.append(worker.model.compute_logits(hidden[:-1]).float())
    assert engine.reset_prefix_cache()    # those blocks now hold these sequences, whatever their hashes say
    return torch.cat(rows)


@pytest.fixture(scope="module")
def fp32_logits(llm_fp32, forced_tokens):
    return _logits(llm_fp32, forced_tokens)


# Measured on the 302 positions of PROMPTS + 64 fp32 greedy tokens each, top-1 agreement / mean / max
# |d logprob| / max |d logit| over the whole vocabulary: s8 fp32 97.0% / 0.041 / 0.33 / 1.69, f8e4m3fn fp32
# 93.7% / 0.101 / 1.13 / 6.73, s8 bf16 97.7% / 0.047 / 0.45 / 2.26 (unquantized bf16: 99.3% / 0.027 / 0.17).
# The bounds leave about 2x room.
@pytest.mark.parametrize("dtype, quant_dtype, min_agreement, max_mean_error, max_error, max_logit_error", [
    ("float32", "s8", 0.94, 0.08, 0.75, 3.5),
    ("float32", "f8e4m3fn", 0.90, 0.2, 2.0, 13.5),
    ("bfloat16", "s8", 0.94, 0.1, 1.0, 4.5),
])
def test_quantized_model_stays_within_measured_bounds_of_fp32(
        quantized, forced_tokens, fp32_scores, fp32_logits, dtype, quant_dtype, min_agreement, max_mean_error,
        max_error, max_logit_error):
    ref_top1, ref_forced = fp32_scores
    llm = quantized(dtype, quant_dtype)
    top1, forced = _score(llm, forced_tokens)
    agreement = (top1 == ref_top1).float().mean().item()
    errors = (forced - ref_forced).abs()
    logit_error = (_logits(llm, forced_tokens) - fp32_logits).abs().max().item()
    print(f"\nneuron_quant {quant_dtype} / {dtype} vs fp32 over {len(errors)} positions: top-1 agreement "
          f"{agreement:.1%}, forced-token |d logprob| mean {errors.mean():.4f} max {errors.max():.4f}, "
          f"max |d logit| {logit_error:.3f}")
    assert logit_error < max_logit_error
    assert len(errors) >= 256
    assert agreement >= min_agreement
    assert errors.mean() < max_mean_error
    assert errors.max() < max_error


def test_s8_equals_the_fp32_model_with_neuron_fake_quantized_weights(quantized, forced_tokens):
    """transformers-neuronx's vector_dynamic s8, written out: per output row scale = absmax / 127 and
    q = clamp(round(w / scale), -128, 127). The unquantized model with q * scale loaded in its decoder layers
    (embeddings and head untouched) scores every position as the quantized one does."""
    ref = LLM(dtype="float32", max_model_len=1024, kv_cache_space=0.05)
    with torch.no_grad():
        for layer in ref.llm_engine.executor.worker.model.layers:
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj):
                scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
                linear.weight.copy_(torch.clamp(torch.round(linear.weight / scale), -128, 127) * scale)
    ref_top1, ref_forced = _score(ref, forced_tokens)
    top1, forced = _score(quantized("float32", "s8"), forced_tokens)
    assert (top1 == ref_top1).all()
    assert (forced - ref_forced).abs().max() < 1e-3


def test_generate_with_the_default_dtype_and_s8_gives_sensible_text(quantized):
    llm = quantized("auto", None)
    assert llm.llm_engine.executor.worker.model.quant_config == NeuronQuantConfig("s8")
    outputs = llm.generate(["The capital of France is", "def fibonacci(n):"],
                           SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert "Paris" in outputs[0].outputs[0].text
    assert "return" in outputs[1].outputs[0].text


def _count_fused_decode_calls(llm: LLM, monkeypatch) -> int:
    """Decode steps the platform ran as its one fused call (ModelOps.decode_layers returning hidden states)."""
    ops = llm.llm_engine.executor.worker.model.ops
    calls = []
    fused = ops.decode_layers
    monkeypatch.setattr(ops, "decode_layers", lambda *args: calls.append(fused(*args)) or calls[-1])
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    return sum(out is not None for out in calls)


def test_quantized_model_decodes_without_the_fused_step(quantized, llm_fp32, monkeypatch):
    """The fused C++ decode step reads unquantized weights; the unquantized model does use it."""
    assert _count_fused_decode_calls(llm_fp32, monkeypatch) > 0
    assert _count_fused_decode_calls(quantized("float32", "s8"), monkeypatch) == 0


@pytest.mark.parametrize("quant_dtype, storage", [("s8", torch.int8), ("f8e4m3fn", torch.float8_e4m3fn)])
def test_decoder_weights_are_stored_quantized_and_the_full_precision_ones_freed(
        quantized, llm_fp32, quant_dtype, storage):
    full = llm_fp32.llm_engine.executor.worker.model
    model = quantized("float32", quant_dtype).llm_engine.executor.worker.model
    layers = [m for m in model.linear_layers() if isinstance(m.method, NeuronQuantLinearMethod)]
    assert len(layers) == 4 * model.config.num_hidden_layers
    assert all(m in layers for m in model.layers.modules() if isinstance(m, LinearLayer))
    assert all(m.weight.dtype == storage and m.weight_scale.dtype == torch.float32 for m in layers)
    assert model.embed_tokens.weight.dtype == torch.float32   # as on Neuron: embeddings and lm_head stay

    def nbytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters()) + sum(
            b.numel() * b.element_size() for b in m.buffers())

    quantized_linear_bytes = sum(m.weight.numel() for m in layers)
    assert nbytes(full) - nbytes(model) == pytest.approx(3 * quantized_linear_bytes, rel=0.01)
    # The CPU platform keeps weights in one arena: the old one, holding the fp32 weights, is gone.
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert len(storages) == 1
    assert next(iter(storages.values())) < sum(p.numel() * p.element_size() for p in model.parameters()) + (4 << 20)
