"""int8 weights, per output channel and symmetric: the one implementation behind

- `int8` (W8A16): quantize a full-precision checkpoint on load, the decoder layers' matmuls as
  neuron_quant does (the same code: NeuronQuantLinearMethod with s8), activations in the compute dtype;
- `w8a8`: the same weights, and the activations quantized to int8 per token (dynamically) for an int8 x int8
  matmul with int32 accumulation, rescaled by both scales: on the platform's int8 matmul where it has one
  (the layer's int_form says w8a8, and ModelOps.int_linear picks the kernel: on the CPU, AMX tiles or
  oneDNN's int8 matmul on weights repacked at the first long step, and for decode-sized steps the integer
  GEMV, which rounds activations per block of 32 inputs rather than per token), else torch._int_mm here;
- compressed-tensors' int-quantized checkpoints (`weight` int8, `weight_scale` [out, 1] or per tensor,
  activations dynamic per token, static per tensor with `input_scale`, or none), through Int8LinearMethod."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from plexus.models.layers.linear import LinearLayer, LinearMethod, WeightDims
from plexus.models.quantization.base import QuantizationConfig
from plexus.models.quantization.neuron_quant import NeuronQuantLinearMethod, int8_form, quantize_weight


class _OnLoadConfig(QuantizationConfig):
    """A method that quantizes a full-precision checkpoint's decoder matmuls as it loads them."""

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> QuantizationConfig:
        if hf_quant_config:
            raise ValueError(f"quantization={cls.name!r} quantizes a full-precision checkpoint on load; this "
                             f"checkpoint is already quantized with {hf_quant_config.get('quant_method')!r}")
        return cls()

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        return self.decoder_method(prefix) if prefix.startswith("layers.") else None

    def decoder_method(self, prefix: str) -> LinearMethod:
        raise NotImplementedError


@dataclass(frozen=True)
class Int8Config(_OnLoadConfig):
    name = "int8"

    def decoder_method(self, prefix: str) -> LinearMethod:
        return NeuronQuantLinearMethod("s8")


@dataclass(frozen=True)
class W8A8Config(_OnLoadConfig):
    name = "w8a8"

    def decoder_method(self, prefix: str) -> LinearMethod:
        return Int8LinearMethod(prefix, weights="online", activations="dynamic")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], scale [M, 1] float32), x ~= q * scale."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    return (x / scale).round_().clamp_(-128, 127).to(torch.int8), scale


class Int8LinearMethod(LinearMethod):
    """weights: "online" (quantize the loaded full-precision weight), "channel" or "tensor" (a checkpoint's
    int8 `weight` with `weight_scale` [out, 1], or one per shard); activations: "dynamic" (per token),
    "static" (`input_scale`, per tensor) or None (weight only, as W8A16)."""

    quantized = True

    def __init__(self, prefix: str, weights: str, activations: str | None) -> None:
        self.prefix, self.weights, self.activations = prefix, weights, activations

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        n, k, shards = layer.local_output_size, layer.local_input_size, len(layer.output_sizes)
        if self.weights == "online":
            super().create_weights(layer, dtype)
            return
        layer.register_weight("weight", torch.empty(n, k, dtype=torch.int8), WeightDims(0, 1))
        if self.weights == "channel":
            layer.register_weight("weight_scale", torch.empty(n, 1, dtype=torch.float32),
                                  WeightDims(0, None, dtype_fixed=True))
        else:
            layer.register_weight("weight_scale", torch.empty(shards, dtype=torch.float32),
                                  WeightDims(None, None, per_shard=True, dtype_fixed=True))
        if self.activations == "static":
            layer.register_weight("input_scale", torch.empty(shards, dtype=torch.float32),
                                  WeightDims(None, None, per_shard=True, dtype_fixed=True))

    def load_weight(self, layer: LinearLayer, name: str, tensor: torch.Tensor, shard: int | None, source: str) -> bool:
        if name in ("weight_zero_point", "input_zero_point") and self.weights != "online":
            if tensor.any():
                raise ValueError(f"checkpoint tensor {source!r}: asymmetric int8 {name.split('_')[0]}s are not "
                                 "supported (the zero points must be 0)")
            return True
        return False

    def process_weights_after_loading(self, layer: LinearLayer) -> None:
        if self.weights == "online":
            q, scale = quantize_weight(layer.weight.detach(), "s8")
            layer.weight = nn.Parameter(q, requires_grad=False)
        elif self.weights == "channel":
            scale = layer.weight_scale.detach()[:, 0].float()
        else:
            scale = torch.cat([s.expand(size) for s, size in zip(layer.weight_scale.detach(), layer.local_output_sizes)])
        if not torch.isfinite(scale).all() or bool((scale < 0).any()):
            raise ValueError(f"{self.prefix}: int8 weight scales must be non-negative and finite")
        layer.weight_scale = nn.Parameter(scale.contiguous(), requires_grad=False)
        if self.activations == "static":
            layer.input_scale_max = nn.Parameter(layer.input_scale.detach().max().reshape(()), requires_grad=False)
            del layer.input_scale
        else:
            # Weight-only and dynamic W8A8 layers: platform kernels may read the int8 weight as it is. (The CPU's
            # decode GEMV then rounds the activations per block of 32 inputs rather than per token: finer, so
            # no less accurate.)
            layer.int_form = int8_form(layer, w8a8=self.activations == "dynamic")

    def dequantize(self, layer: LinearLayer) -> torch.Tensor:
        return layer.weight.float() * layer.weight_scale[:, None]

    def apply(self, layer: LinearLayer, x: torch.Tensor) -> torch.Tensor:
        if self.activations is None:
            return NeuronQuantLinearMethod.apply(self, layer, x)
        rows = x.reshape(-1, layer.local_input_size)
        if self.activations == "dynamic":
            q, x_scale = quantize_per_token(rows)
        else:
            x_scale = layer.input_scale_max
            q = (rows.float() / x_scale).round_().clamp_(-128, 127).to(torch.int8)
        y = torch._int_mm(q, layer.weight.t()).float() * x_scale * layer.weight_scale
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        bias = layer.bias_for_rank()
        return y if bias is None else y + bias
