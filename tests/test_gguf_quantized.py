"""quantization="gguf": a GGUF file's linear weights stay in their ggml blocks and are dequantized a chunk of
rows at a time per matmul. The references are gguf-py's own dequantize (an independent numpy implementation)
and, end to end, the default run of the same file, dequantized once at conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants

import plexus.models.quantization.gguf as gguf_method
from plexus import LLM, SamplingParams
from plexus.model_files.gguf import bundled_gguf_path
from plexus.models.layers.linear import LinearLayer
from plexus.models.quantization.gguf import GGUFLinearMethod, dequantize

T = GGMLQuantizationType
QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
GGUF_PY_QUANTIZES = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, *FLOAT_TYPES}
# Byte offsets of each block's fp16 fields (d, and m / dmin where the type has one).
HALF_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2],
               T.Q5_K: [0, 2], T.Q6_K: [208]}
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"]


def random_rows(ggml_type: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid GGUF rows, uint8 [rows, bytes per row]: every bit field random, the fp16 scales finite."""
    rng = np.random.default_rng(seed)
    if ggml_type in FLOAT_TYPES:
        return gguf_quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), ggml_type).view(np.uint8)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    data = rng.integers(0, 256, size=(rows, cols // block_size * type_size), dtype=np.uint8)
    blocks = data.reshape(-1, type_size)
    for offset in HALF_FIELDS[ggml_type]:
        halves = (rng.standard_normal(len(blocks)) * 0.02).astype(np.float16)
        blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return data


@pytest.mark.parametrize("ggml_type", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact_to_gguf_py(ggml_type):
    rows = random_rows(ggml_type, 7, 512)
    expected = gguf_quants.dequantize(rows, ggml_type)
    got = dequantize(torch.from_numpy(rows), ggml_type)
    assert got.dtype == torch.float32 and got.shape == (7, 512)
    assert np.array_equal(got.numpy(), expected)
    if ggml_type in GGUF_PY_QUANTIZES:
        weights = np.random.default_rng(1).standard_normal((5, 256), dtype=np.float32)
        quantized = gguf_quants.quantize(weights, ggml_type).view(np.uint8)
        assert np.array_equal(dequantize(torch.from_numpy(quantized), ggml_type).numpy(),
                              gguf_quants.dequantize(quantized, ggml_type))


def gguf_layer(types: list[GGMLQuantizationType], sizes: list[int], in_features: int, bias: bool = False,
               dtype: torch.dtype = torch.float32, **parallel) -> tuple[LinearLayer, torch.Tensor, torch.Tensor | None]:
    """A fused GGUF layer loaded shard by shard as from a checkpoint, with the reference-dequantized weight
    [out, in] and bias it stands for."""
    layer = LinearLayer(in_features, sizes, bias, method=GGUFLinearMethod(), dtype=dtype, **parallel)
    fused = len(sizes) > 1
    weights, biases = [], []
    for shard, (ggml_type, size) in enumerate(zip(types, sizes)):
        rows = random_rows(ggml_type, size, in_features, seed=shard)
        weights.append(torch.from_numpy(gguf_quants.dequantize(rows, ggml_type)))
        layer.load_weight("qweight", torch.from_numpy(rows), shard if fused else None)
        layer.load_weight("qweight_type", torch.tensor(int(ggml_type), dtype=torch.int32), shard if fused else None)
        if bias:
            biases.append(torch.randn(size))
            layer.load_weight("bias", biases[-1], shard if fused else None)
    assert layer.missing_weights() == []
    layer.method.process_weights_after_loading(layer)
    return layer, torch.cat(weights), torch.cat(biases).to(dtype) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_of_mixed_types_matches_f_linear_on_the_dequantized_weight(dtype, monkeypatch):
    """A Q4_K_M-style qkv (q and k Q4_K, v Q6_K), in chunks smaller than one shard."""
    monkeypatch.setattr(gguf_method, "CHUNK_ELEMENTS", 40 * 512)
    layer, weight, bias = gguf_layer([T.Q4_K, T.Q4_K, T.Q6_K], [96, 64, 64], 512, bias=True, dtype=dtype)
    assert [(g.ggml_type, g.rows) for g in layer.gguf_groups] == [(T.Q4_K, 160), (T.Q6_K, 64)]
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 160 * 288 + 64 * 420
    x = torch.randn(2, 3, 512)
    expected = F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))
    got = layer(x.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 3, 224)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_each_type_matches_f_linear_on_the_dequantized_weight(ggml_type):
    layer, weight, _ = gguf_layer([ggml_type], [48], 256)
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-5, atol=1e-5 * weight.abs().max().item())


def test_tensor_parallel_ranks_reassemble_the_full_output():
    x = torch.randn(3, 512)
    _, weight, _ = gguf_layer([T.Q8_0, T.Q5_1], [64, 32], 512)
    columns = [gguf_layer([T.Q8_0, T.Q5_1], [64, 32], 512, parallel="column", tp_rank=r, tp_size=2)[0](x)
               for r in range(2)]   # each rank: its half of shard 0, then its half of shard 1
    got = torch.cat([columns[0][:, :32], columns[1][:, :32], columns[0][:, 32:], columns[1][:, 32:]], dim=-1)
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    rows = [gguf_layer([T.Q4_K], [32], 512, parallel="row", tp_rank=r, tp_size=2) for r in range(2)]
    torch.testing.assert_close(rows[0][0](x[:, :256]) + rows[1][0](x[:, 256:]), F.linear(x, rows[0][1]),
                               rtol=1e-5, atol=1e-4)


def test_unsupported_types_and_partial_blocks_name_the_tensor():
    layer = LinearLayer(256, [32], bias=False, method=GGUFLinearMethod())
    layer.load_weight("qweight", torch.zeros(32, 84, dtype=torch.uint8), source="layers.0.mlp.down_proj.qweight")
    layer.load_weight("qweight_type", torch.tensor(int(T.Q2_K), dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'layers.0.mlp.down_proj.qweight' has type Q2_K.*runs .*Q4_0"):
        layer.method.process_weights_after_loading(layer)
    layer = LinearLayer(100, [32], bias=False, method=GGUFLinearMethod())
    layer.load_weight("qweight", torch.zeros(32, 72, dtype=torch.uint8), source="o_proj.qweight")
    layer.load_weight("qweight_type", torch.tensor(int(T.Q4_0), dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'o_proj.qweight'.*100 values is not a whole number of Q4_0 blocks"):
        layer.method.process_weights_after_loading(layer)


@pytest.fixture(scope="module")
def llm_gguf_fp32():
    return LLM(model=str(bundled_gguf_path()), quantization="gguf", dtype="float32", max_model_len=1024,
               kv_cache_space=0.05)


def test_bundled_q4_1_model_keeps_its_blocks_and_greedy_matches_the_dequantized_run(llm_gguf_fp32, llm_fp32):
    model = llm_gguf_fp32.llm_engine.executor.worker.model
    decoder = [layer for layer in model.linear_layers() if layer is not model.lm_head]
    assert len(decoder) == 4 * 30 and all(layer.method.quantized for layer in decoder)
    # Q4_1 blocks are repacked at load into the packed integer form: half a byte per weight, and per group
    # of 32 a float32 scale (the block's d) and offset (its m + 8 d).
    assert all(layer.gguf_packed == 4 and not layer.gguf_groups for layer in decoder)
    values = sum(layer.input_size * sum(layer.output_sizes) for layer in decoder)
    assert sum(layer.qweight.numel() for layer in decoder) == values // 2
    assert sum(layer.gguf_scales.numel() + layer.gguf_offsets.numel() for layer in decoder) == values // 16
    # The head runs in the embedding's stored type, Q8_0 (the embedding itself is dequantized for lookups).
    assert model.lm_head.gguf_packed == 8 and not model.tie_word_embeddings

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    # One thread: a step runs thousands of small dequantizing ops, and on a shared machine each of their
    # parallel regions can wait for a descheduled second thread (10x slower measured on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = llm_gguf_fp32.generate(PROMPTS, params, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    expected = llm_fp32.generate(PROMPTS, params, use_tqdm=False)
    for g, e in zip(got, expected):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids, g.prompt


def test_gguf_quantization_of_a_model_that_is_not_gguf_is_refused(smollm_dir):
    with pytest.raises(ValueError, match=r"quantization='gguf' runs GGUF files.*model=path/to/model.gguf"):
        LLM(model=str(smollm_dir), quantization="gguf")


def test_a_gguf_file_with_an_unsupported_type_names_the_tensor_and_type(tmp_path):
    path = tmp_path / "tiny-Q2_K.gguf"
    writer = GGUFWriter(str(path), "llama")
    rows = np.zeros((8, GGML_QUANT_SIZES[T.Q2_K][1]), dtype=np.uint8)   # 8 rows of 256 values
    writer.add_tensor("blk.0.attn_q.weight", rows, raw_shape=rows.shape, raw_dtype=T.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight' has type Q2_K.*leave quantization unset"):
        LLM(model=str(path), quantization="gguf")
