"""neuron_quant: AWS Neuron's weight quantization, as plain torch for every other platform.

On Neuron, transformers-neuronx does it (QuantizationConfig(quant_dtype=$NEURON_QUANT_DTYPE,
quantize_method="vector_dynamic")): the decoder layers' matmul weights (attention qkv and o, the MLP; not
the embeddings or the lm_head) are stored quantized per output channel, symmetric, and each matmul runs on
the quantized weight cast to the compute dtype, its output then rescaled per channel in fp32. The layer
here computes the same thing, so the method means one thing on every platform."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plexus.models.layers.linear import LinearLayer, LinearMethod
from plexus.models.quantization.base import QuantizationConfig
from plexus.models.quantization.packed import PackedInt

QUANT_DTYPES = {"s8": torch.int8, "f8e4m3fn": torch.float8_e4m3fn}
# The largest quantized magnitude: int8's, and for fp8 transformers-neuronx's FpBounds.max (Neuron's e4m3
# range), 240 rather than float8_e4m3fn's 448, so that the stored values are the ones the Neuron SDK stores.
_QMAX = {"s8": 127.0, "f8e4m3fn": 240.0}
# Up to this many rows torch's int8 x bf16 kernel beats casting the weight for F.linear; above, it falls
# behind (SmolLM2's four matmul shapes, 2 AVX-512 cores: break-even at 16-24 rows).
INT8PACK_MAX_ROWS = 16


@dataclass(frozen=True)
class NeuronQuantConfig(QuantizationConfig):
    quant_dtype: str = "s8"   # "s8" | "f8e4m3fn", from NEURON_QUANT_DTYPE as in vLLM
    ignored: tuple[str, ...] = ()
    name = "neuron_quant"

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> NeuronQuantConfig:
        quant_dtype = environ.get("NEURON_QUANT_DTYPE") or "s8"
        if quant_dtype not in QUANT_DTYPES:
            raise ValueError(f"NEURON_QUANT_DTYPE={quant_dtype!r} is not supported; allowed: {', '.join(QUANT_DTYPES)}")
        return cls(quant_dtype)

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        """Decoder layers' matmuls only: the embeddings and the lm_head stay unquantized, as in the SDK."""
        return NeuronQuantLinearMethod(self.quant_dtype) if prefix.startswith("layers.") else None


def quantize_weight(weight: torch.Tensor, quant_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] in the quant dtype, scale [N] fp32), weight ~= q * scale[:, None]."""
    q = weight.to(torch.float32, copy=True)   # one temporary, worked on in place
    scale = torch.linalg.vector_norm(q, float("inf"), dim=1) / _QMAX[quant_dtype]
    q.div_(torch.where(scale > 0, scale, 1.0)[:, None])   # all-zero rows stay zero
    if quant_dtype == "s8":
        q.round_().clamp_(-127, 127)
    return q.to(QUANT_DTYPES[quant_dtype]), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def int8_form(layer: LinearLayer, w8a8: bool = False) -> PackedInt | None:
    """A layer's int8 `weight` [N, K] with per-channel `weight_scale` [N] as the packed integer form (its 8-bit
    case as it is, one group per row)."""
    if layer.weight.dtype != torch.int8:
        return None
    return PackedInt(layer.weight, layer.weight_scale, None, 8, w8a8=w8a8)


class NeuronQuantLinearMethod(LinearMethod):
    """Loads the checkpoint's full-precision `weight`, then keeps it quantized (`weight` [N, K] int8 or
    float8_e4m3fn, `weight_scale` [N] fp32) and drops the original; the bias stays in the compute dtype."""

    quantized = True

    def __init__(self, quant_dtype: str) -> None:
        self.quant_dtype = quant_dtype

    def process_weights_after_loading(self, layer: LinearLayer) -> None:
        q, scale = quantize_weight(layer.weight.detach(), self.quant_dtype)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        layer.int_form = int8_form(layer)

    def dequantize(self, layer: LinearLayer) -> torch.Tensor:
        """The weight this layer multiplies by, [N, K] fp32."""
        return dequantize(layer.weight, layer.weight_scale, torch.float32)

    def apply(self, layer: LinearLayer, x: torch.Tensor) -> torch.Tensor:
        out_features, in_features = layer.weight.shape
        rows = x.numel() // in_features
        # (In compiled graphs inductor lowers the cast-and-matmul form below itself.)
        if (layer.weight.dtype == torch.int8 and x.dtype in (torch.bfloat16, torch.float16)
                and x.device.type == "cpu" and 0 < rows <= INT8PACK_MAX_ROWS and not torch.compiler.is_compiling()):
            # Unit scales: the kernel only does the int8 x bf16 product, the fp32 rescale is Neuron's below.
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, in_features).contiguous(), layer.weight,
                                                     x.new_ones(out_features))
            out = out.view(*x.shape[:-1], out_features)
        else:
            out = F.linear(x, layer.weight.to(x.dtype))   # int8 and e4m3 values are exact in bf16
        out = (out * layer.weight_scale).to(x.dtype)
        bias = layer.bias_for_rank()
        return out if bias is None else out + bias
