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

QUANT_DTYPES = {"s8": torch.int8, "f8e4m3fn": torch.float8_e4m3fn}
# The largest quantized magnitude: int8's, and for fp8 transformers-neuronx's FpBounds.max (Neuron's e4m3
# range), 240 rather than float8_e4m3fn's 448, so that the stored values are the ones the Neuron SDK stores.
_QMAX = {"s8": 127.0, "f8e4m3fn": 240.0}
# Up to this many rows torch's int8 x bf16 kernel beats casting the weight for F.linear; above, it falls
# behind (SmolLM2's four matmul shapes, 2 AVX-512 cores: break-even at 16-24 rows).
INT8PACK_MAX_ROWS = 16


@dataclass(frozen=True)
class NeuronQuantConfig:
    quant_dtype: str = "s8"   # "s8" | "f8e4m3fn", from NEURON_QUANT_DTYPE as in vLLM

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> NeuronQuantConfig:
        quant_dtype = environ.get("NEURON_QUANT_DTYPE", "s8")
        if quant_dtype not in QUANT_DTYPES:
            raise ValueError(f"NEURON_QUANT_DTYPE={quant_dtype!r} is not supported; allowed: {', '.join(QUANT_DTYPES)}")
        return cls(quant_dtype)

    def quantize_layer(self, prefix: str, layer: nn.Module) -> nn.Module | None:
        """The replacement for a model's submodule, or None to keep it: decoder layers' nn.Linear only."""
        if isinstance(layer, nn.Linear) and prefix.startswith("layers."):
            return NeuronQuantLinear(layer, self.quant_dtype)
        return None


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


class NeuronQuantLinear(nn.Module):
    """An nn.Linear whose weight is stored quantized (the full-precision one is dropped); the bias stays in
    the compute dtype."""

    def __init__(self, linear: nn.Linear, quant_dtype: str) -> None:
        super().__init__()
        q, scale = quantize_weight(linear.weight.detach(), quant_dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(q, requires_grad=False)               # [N, K] int8 | float8_e4m3fn
        self.weight_scale = nn.Parameter(scale, requires_grad=False)     # [N] fp32
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # (In compiled graphs inductor lowers the cast-and-matmul form below itself.)
        if (self.weight.dtype == torch.int8 and x.dtype in (torch.bfloat16, torch.float16)
                and x.device.type == "cpu" and 0 < rows <= INT8PACK_MAX_ROWS and not torch.compiler.is_compiling()):
            # Unit scales: the kernel only does the int8 x bf16 product, the fp32 rescale is Neuron's below.
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), self.weight,
                                                     x.new_ones(self.out_features))
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype))   # int8 and e4m3 values are exact in bf16
        out = (out * self.weight_scale).to(x.dtype)
        return out if self.bias is None else out + self.bias
