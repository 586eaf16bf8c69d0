"""The one linear layer: fused shards load from the checkpoint's separate tensors, the per-token delta hook
adds after the base output over any method, and column/row sharding splits a layer so that the ranks'
outputs reassemble the unsharded one. The references are plain F.linear on the full weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plexus.models.layers.linear import LinearLayer
from plexus.models.quantization.neuron_quant import NeuronQuantConfig, NeuronQuantLinearMethod

SIZES = [8, 4, 4]       # q, k, v rows of a fused qkv layer
IN = 12


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, IN, generator=g) for n in SIZES]
    biases = [torch.randn(n, generator=g) for n in SIZES]
    return weights, biases


def _load(layer: LinearLayer, weights, biases) -> LinearLayer:
    for shard, (w, b) in enumerate(zip(weights, biases)):
        layer.load_weight("weight", w, shard)
        layer.load_weight("bias", b, shard)
    layer.method.process_weights_after_loading(layer)
    return layer


def test_fused_layer_loads_shards_and_computes_the_concatenated_projection():
    weights, biases = _tensors()
    layer = _load(LinearLayer(IN, SIZES, bias=True), weights, biases)
    x = torch.randn(5, IN)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat(weights), torch.cat(biases)))
    assert layer.missing_weights() == []


def test_missing_and_misplaced_checkpoint_tensors_are_named():
    weights, _ = _tensors()
    layer = LinearLayer(IN, SIZES, bias=True)
    layer.load_weight("weight", weights[0], 0)
    assert layer.missing_weights() == ["weight#1", "weight#2", "bias#0", "bias#1", "bias#2"]
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.qweight' has no place.*weight, bias"):
        layer.load_weight("qweight", weights[0], 0, source="model.layers.0.self_attn.q_proj.qweight")
    with pytest.raises(ValueError, match=r"shape \(4, 12\).*expected \(8, 12\)"):
        layer.load_weight("weight", weights[1], 0)


@pytest.mark.parametrize("quantized", [False, True], ids=["unquantized", "neuron_quant-s8"])
def test_delta_is_added_per_token_after_the_base_output(quantized):
    """A LoRA-shaped delta B(A x) over the unquantized activations: the same as merging B A into the
    weight, for the unquantized method; over a quantized base it adds exactly the delta."""
    weights, biases = _tensors(1)
    method = NeuronQuantLinearMethod("s8") if quantized else None
    layer = _load(LinearLayer(IN, SIZES, bias=True, method=method), weights, biases)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, IN, generator=g), torch.randn(sum(SIZES), 2, generator=g)
    x = torch.randn(6, IN)
    base = layer(x)
    layer.delta = lambda inp: F.linear(F.linear(inp, a), b)
    torch.testing.assert_close(layer(x), base + x @ a.T @ b.T)
    if not quantized:
        torch.testing.assert_close(layer(x), F.linear(x, torch.cat(weights) + b @ a, torch.cat(biases)))


def test_column_sharding_splits_every_output_shard_and_the_ranks_reassemble_the_output():
    weights, biases = _tensors(3)
    x = torch.randn(4, IN)
    full = F.linear(x, torch.cat(weights), torch.cat(biases))
    pieces = [_load(LinearLayer(IN, SIZES, True, parallel="column", tp_rank=r, tp_size=2), weights, biases)(x)
              for r in range(2)]
    assert [p.shape[1] for p in pieces] == [sum(SIZES) // 2] * 2
    # Each rank holds half of q, half of k and half of v, in that order.
    reassembled = []
    for shard, size in enumerate(SIZES):
        local_offset = sum(s // 2 for s in SIZES[:shard])
        for rank in range(2):
            reassembled.append(pieces[rank][:, local_offset:local_offset + size // 2])
    torch.testing.assert_close(torch.cat(reassembled, dim=1), full)


def test_row_sharding_splits_the_input_and_the_ranks_outputs_sum_to_the_full_output():
    g = torch.Generator().manual_seed(4)
    w, bias = torch.randn(6, IN, generator=g), torch.randn(6, generator=g)
    x = torch.randn(3, IN)
    outs = []
    for rank in range(3):
        layer = LinearLayer(IN, [6], True, parallel="row", tp_rank=rank, tp_size=3)
        layer.load_weight("weight", w)
        layer.load_weight("bias", bias)
        outs.append(layer(x[:, rank * 4:(rank + 1) * 4]))
    torch.testing.assert_close(sum(outs), F.linear(x, w, bias))


def test_sharding_refuses_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="not divisible by tp_size=3"):
        LinearLayer(IN, SIZES, False, parallel="column", tp_size=3)


def test_ignore_list_leaves_the_named_layers_unquantized_and_fused_shards_must_agree():
    config = NeuronQuantConfig("s8", ignored=("re:.*down_proj", "layers.1.self_attn.q_proj",
                                              "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj"))
    assert not config.linear_method("layers.0.mlp.down_proj", ["layers.0.mlp.down_proj"]).quantized
    assert config.linear_method("layers.0.mlp.gate_up_proj",
                                ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]).quantized
    assert not config.linear_method("layers.1.self_attn.qkv_proj", [
        "layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj"]).quantized
    # transformers' modules_to_not_convert spelling: a module's last name.
    assert not NeuronQuantConfig("s8", ignored=("o_proj",)).linear_method(
        "layers.3.self_attn.o_proj", ["layers.3.self_attn.o_proj"]).quantized
    with pytest.raises(ValueError, match="skips only some of .*q_proj.*fused layer 'layers.2.self_attn.qkv_proj'"):
        NeuronQuantConfig("s8", ignored=("layers.2.self_attn.q_proj",)).linear_method(
            "layers.2.self_attn.qkv_proj",
            ["layers.2.self_attn.q_proj", "layers.2.self_attn.k_proj", "layers.2.self_attn.v_proj"])
