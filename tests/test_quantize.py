"""`plexus quantize`: the algorithms (RTN, GPTQ, AWQ), the three checkpoint layouts, and the command.

The layouts are checked by unpacking them here, from each format's specification, independently of
plexus's packer; the algorithms by the errors they exist to reduce, on a tiny random Llama whose
activations have a few large channels, as real models' do."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from plexus.entrypoints.cli import main
from plexus.quantize import QuantizeConfig, quantize_model
from plexus.quantize import awq as awq_method
from plexus.quantize.calibration import calibration_ids, capture_inputs, first_layer_inputs
from plexus.quantize.formats import awq_tensors, compressed_tensors_tensors, gptq_tensors
from plexus.quantize.gptq import Hessian, gptq_quantize
from plexus.quantize.rtn import Quantizer, rtn_quantize

OUTLIERS = [3, 40, 77, 101]   # input channels with large activations


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama (hidden 128, intermediate 256, vocab 256) with a byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[OUTLIERS] = 12.0
            layer.post_attention_layernorm.weight[OUTLIERS] = 12.0
    model.save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
    return path


def load(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def layer0_inputs(path, linear: str, num_samples=8, seq_len=128) -> torch.Tensor:
    """What `linear` of layer 0 sees on the default calibration text: [tokens, in]."""
    from transformers import AutoTokenizer

    model = load(path)
    ids = calibration_ids(AutoTokenizer.from_pretrained(path), QuantizeConfig().calibration, num_samples, seq_len)
    layer = model.model.layers[0]
    seen = []
    with torch.no_grad(), capture_inputs({linear: layer.get_submodule(linear)}, lambda n, x: seen.append(x)):
        for batch in first_layer_inputs(model, ids):
            layer(batch.hidden, **batch.kwargs)
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]), layer.get_submodule(linear).weight.detach()


# --- independent unpacking, from the formats' specifications ------------------------------------------

def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Fields of `bits` bits, lowest first (or slot k holding element order[k]), along `dim`."""
    per = 32 // bits
    order = order or list(range(per))
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = p if dim == 1 else p.t()
    fields = torch.stack([(p >> (bits * slot)) & ((1 << bits) - 1) for slot in range(per)], dim=-1)
    values = torch.empty_like(fields)
    values[..., list(order)] = fields           # element order[slot] sits in slot
    values = values.reshape(p.shape[0], -1)
    return values if dim == 1 else values.t()


def dequant_compressed_tensors(t: dict, prefix: str, bits: int, group_size: int) -> torch.Tensor:
    out_features, in_features = t[f"{prefix}.weight_shape"].tolist()
    signed = unpack_int32(t[f"{prefix}.weight_packed"], bits, 1)[:, :in_features] - 2 ** (bits - 1)
    scale = t[f"{prefix}.weight_scale"].float()
    zero = torch.zeros_like(scale, dtype=torch.int64)
    if f"{prefix}.weight_zero_point" in t:
        zero = unpack_int32(t[f"{prefix}.weight_zero_point"], bits, 0)[:out_features] - 2 ** (bits - 1)
    g = t.get(f"{prefix}.weight_g_idx", torch.arange(in_features) // group_size).long()
    return scale[:, g] * (signed - zero[:, g]).float()


def dequant_gptq(t: dict, prefix: str, bits: int) -> torch.Tensor:
    q = unpack_int32(t[f"{prefix}.qweight"], bits, 0)               # [in, out]
    zero = unpack_int32(t[f"{prefix}.qzeros"], bits, 1) + 1         # [groups, out]
    g = t[f"{prefix}.g_idx"].long()
    return (t[f"{prefix}.scales"].float()[g] * (q - zero[g]).float()).t()


def dequant_awq(t: dict, prefix: str, group_size: int) -> torch.Tensor:
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    q = unpack_int32(t[f"{prefix}.qweight"], 4, 1, order)           # [in, out]
    zero = unpack_int32(t[f"{prefix}.qzeros"], 4, 1, order)         # [groups, out]
    g = torch.arange(q.shape[0]) // group_size
    return (t[f"{prefix}.scales"].float()[g] * (q - zero[g]).float()).t()


def test_unpacker_reads_a_hand_packed_word():
    # 8 4-bit fields 1..8, lowest first: 0x87654321; in AWQ order the word holds elements 0,2,4,6,1,3,5,7.
    word = torch.tensor([[0x87654321 - 2 ** 32]], dtype=torch.int32)
    assert unpack_int32(word, 4, 1).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert unpack_int32(word, 4, 1, [0, 2, 4, 6, 1, 3, 5, 7]).tolist() == [[1, 5, 2, 6, 3, 7, 4, 8]]


def quantized_weights(bits, sym, act_order, scale_dtype=torch.float16, min_zero=0, static_groups=False):
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.rand(256) * 0.1
    quantizer = Quantizer(bits, sym, scale_dtype, min_zero)
    if act_order:
        x = torch.randn(512, 256) * torch.linspace(0.1, 3, 256)
        h = Hessian(256)
        h.add(x)
        return gptq_quantize(w, h.matrix(), quantizer, 32, act_order=True, static_groups=static_groups)
    return rtn_quantize(w, quantizer, 32)


@pytest.mark.parametrize("bits, sym, act_order", [(4, True, False), (4, False, False), (8, True, False),
                                                  (8, False, True), (4, True, True)])
def test_compressed_tensors_packing_unpacks_to_the_dequantized_weight(bits, sym, act_order):
    qw = quantized_weights(bits, sym, act_order, static_groups=True)
    cfg = QuantizeConfig(method="gptq" if act_order else "rtn", bits=bits, group_size=32, sym=sym,
                         act_order=act_order)
    t = compressed_tensors_tensors("m", qw, cfg, torch.float16)
    assert t["m.weight_packed"].dtype == torch.int32 and t["m.weight_packed"].shape == (64, 256 * bits // 32)
    assert t["m.weight_scale"].dtype == torch.float16 and t["m.weight_scale"].shape == (64, 8)
    assert ("m.weight_zero_point" in t) == (not sym) and "m.weight_g_idx" not in t   # actorder "weight"
    if not sym:
        assert t["m.weight_zero_point"].shape == (64 * bits // 32, 8)
    assert torch.equal(dequant_compressed_tensors(t, "m", bits, 32), qw.dequantize())


@pytest.mark.parametrize("bits, sym, act_order", [(4, True, False), (4, False, False), (8, True, True)])
def test_gptq_packing_unpacks_to_the_dequantized_weight(bits, sym, act_order):
    qw = quantized_weights(bits, sym, act_order, min_zero=1)
    t = gptq_tensors("m", qw)
    assert t["m.qweight"].shape == (256 * bits // 32, 64) and t["m.qzeros"].shape == (8, 64 * bits // 32)
    assert t["m.scales"].shape == (8, 64) and t["m.scales"].dtype == torch.float16
    assert t["m.g_idx"].dtype == torch.int32
    assert torch.equal(dequant_gptq(t, "m", bits), qw.dequantize())
    if sym:   # GPTQ v1 stores zero - 1: 2^(bits-1) - 1 in every field
        assert (unpack_int32(t["m.qzeros"], bits, 1) == 2 ** (bits - 1) - 1).all()


def test_awq_packing_unpacks_to_the_dequantized_weight():
    qw = quantized_weights(4, False, False)
    t = awq_tensors("m", qw)
    assert t["m.qweight"].shape == (256, 8) and t["m.qzeros"].shape == (8, 8) and t["m.scales"].shape == (8, 64)
    assert torch.equal(dequant_awq(t, "m", 32), qw.dequantize())
    # Plain (non-interleaved) unpacking would read other columns: the order matters.
    plain = (t["m.scales"].float()[torch.arange(256) // 32] * (unpack_int32(t["m.qweight"], 4, 1)
             - unpack_int32(t["m.qzeros"], 4, 1)[torch.arange(256) // 32]).float()).t()
    assert not torch.equal(plain, qw.dequantize())


# --- the algorithms --------------------------------------------------------------------------------------

def output_error(x, w, w_hat) -> float:
    return ((x @ w.t() - x @ w_hat.t()).norm() / (x @ w.t()).norm()).item()


@pytest.mark.parametrize("linear", ["self_attn.q_proj", "mlp.down_proj"])
def test_gptq_reconstructs_the_layer_output_better_than_rtn(tiny_model, linear):
    x, w = layer0_inputs(tiny_model, linear)
    h = Hessian(w.shape[1])
    h.add(x)
    quantizer = Quantizer(4, True)
    rtn = output_error(x, w, rtn_quantize(w, quantizer, 32).dequantize())
    gptq = gptq_quantize(w, h.matrix(), quantizer, 32)
    ordered = gptq_quantize(w, h.matrix(), quantizer, 32, act_order=True)
    assert output_error(x, w, gptq.dequantize()) < 0.8 * rtn
    # Act order: groups are runs of the descending-diag(H) order, recorded per column in g_idx.
    assert not torch.equal(ordered.g_idx, gptq.g_idx)
    assert torch.bincount(ordered.g_idx).tolist() == [32] * (w.shape[1] // 32)
    first = torch.argsort(torch.diag(h.matrix()), descending=True)[:32]
    assert (ordered.g_idx[first] == 0).all()
    assert output_error(x, w, ordered.dequantize()) <= output_error(x, w, gptq.dequantize())
    # Static groups (compressed-tensors' actorder "weight"): act order within column-order groups.
    static = gptq_quantize(w, h.matrix(), quantizer, 32, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx, gptq.g_idx)
    assert output_error(x, w, static.dequantize()) < 0.8 * rtn


def test_awq_scales_reduce_the_activation_weighted_error_of_rtn(tiny_model):
    from transformers import AutoTokenizer

    model = load(tiny_model)
    layer = model.model.layers[0]
    x, w = layer0_inputs(tiny_model, "mlp.gate_proj")
    quantizer = Quantizer(4, False)
    rtn = output_error(x, w, rtn_quantize(w, quantizer, 32).dequantize())
    ids = calibration_ids(AutoTokenizer.from_pretrained(tiny_model), QuantizeConfig().calibration, 8, 128)
    with torch.no_grad():
        batches = first_layer_inputs(model, ids)
        result = awq_method.quantize_layer(layer, batches, quantizer, 32, clip=False)
    # AWQ divided post_attention_layernorm by s: gate_proj now sees x / s and holds W * s.
    r = layer.post_attention_layernorm.weight / load(tiny_model).model.layers[0].post_attention_layernorm.weight
    awq = output_error(x * r, w / r, result["mlp.gate_proj"].dequantize())
    assert awq < 0.7 * rtn
    assert r[OUTLIERS].max() < r.median()   # the large channels got the large scales


# --- the command -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--format", "awq", "--sym"], "--sym"),
    (["--format", "awq", "--bits", "8", "--asym"], "--bits 8: the awq format stores 4 bits"),
    (["--bits", "3"], "--bits 3"),
    (["--method", "awq", "--act-order"], "--act-order"),
    (["--group-size", "48"], "--group-size 48: must divide the input dimension"),
    (["--group-size", "0"], "--group-size 0"),
    (["--method", "gptq", "--calibration", "/nonexistent.txt"], "--calibration /nonexistent.txt"),
])
def test_bad_settings_are_refused_naming_the_flag(tiny_model, tmp_path, capsys, flags, message):
    assert main(["quantize", str(tiny_model), "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt, flags, expected", [
    ("compressed-tensors", ["--method", "gptq", "--act-order"], "weight_packed"),
    ("gptq", ["--method", "gptq", "--asym"], "qzeros"),
    ("awq", ["--method", "awq"], "qzeros"),
])
def test_cli_writes_a_complete_quantized_model_directory(tiny_model, tmp_path, fmt, flags, expected):
    out = tmp_path / fmt
    assert main(["quantize", str(tiny_model), "--format", fmt, "--group-size", "32", "--out", str(out),
                 "--num-samples", "4", "--seq-len", "64", *flags]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert ("quantize_config.json" in files) == (fmt == "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    t = load_file(out / "model.safetensors")
    original = load(tiny_model).state_dict()
    prefix = "model.layers.1.mlp.down_proj"
    assert f"{prefix}.weight" not in t and f"{prefix}.{expected}" in t
    assert "lm_head.weight" in t and "model.norm.weight" in t
    if fmt == "compressed-tensors":
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
        group = qc["config_groups"]["group_0"]
        assert group["targets"] == ["Linear"]
        assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size",
                                                 "actorder")} == {"num_bits": 4, "type": "int", "symmetric": True,
                                                                  "strategy": "group", "group_size": 32,
                                                                  "actorder": "weight"}
        w_hat = dequant_compressed_tensors(t, prefix, 4, 32)
        assert t["model.norm.weight"].dtype == torch.float32    # the model's own dtype
    elif fmt == "gptq":
        assert qc == json.loads((out / "quantize_config.json").read_text())
        assert {k: qc[k] for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "quant_method")} \
            == {"bits": 4, "group_size": 32, "desc_act": False, "sym": False, "checkpoint_format": "gptq",
                "quant_method": "gptq"}
        w_hat = dequant_gptq(t, prefix, 4)
        assert t["model.norm.weight"].dtype == torch.float16
    else:
        assert qc == {"quant_method": "awq", "version": "gemm", "zero_point": True, "group_size": 32, "bits": 4,
                      "modules_to_not_convert": None}
        w_hat = dequant_awq(t, prefix, 32)
        assert t["model.norm.weight"].dtype == torch.float16
    w = original[f"{prefix}.weight"]
    if fmt != "awq":    # AWQ stores W * s; its reconstruction is checked through the layer's output above
        assert ((w_hat - w).norm() / w.norm()).item() < 0.15


def test_quantize_model_leaves_dequantized_weights_in_the_model(tiny_model):
    model = load(tiny_model)
    result = quantize_model(model, tiny_model, QuantizeConfig(method="rtn", group_size=32))
    assert len(result) == 2 * 7
    w = model.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(w, result["model.layers.1.self_attn.o_proj"].dequantize())
