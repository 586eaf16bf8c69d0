"""quant_method "mxfp4": gpt-oss's checkpoints, whose routed experts are stored in MXFP4 (the OCP Microscaling
format: blocks of 32 FP4 e2m1 values sharing one e8m0 power-of-two scale) and everything else in bf16.

The experts' `*_blocks` (uint8 [E, out, in / 32, 16], two values a byte, the first in the low nibble) and
`*_scales` (uint8 [E, out, in / 32], the scale 2^(s - 127)) are kept as 8-bit integers with a scale per block
of 32 (plexus.models.layers.moe calls mxfp4_as_int8): twice each e2m1 value is an integer in -12..12 and half
the block's scale a power of two, so the values are exactly MXFP4's, at one byte a weight (half bf16's memory
and bandwidth, twice MXFP4's), and run on the platform's integer experts kernel (on the CPU the VNNI GEMV, which
rounds the activations to int8 per block of 32 in bf16 steps; fp32 steps multiply the exact weights).
dequantize_mxfp4 gives the values in a float dtype (for checkpoints' other uses and tests). Linear layers are
never MXFP4 (transformers' integration replaces only the experts), so every linear here is unquantized,
whatever modules_to_not_convert says."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from plexus.models.layers.linear import LinearMethod
from plexus.models.quantization.base import QuantizationConfig

# e2m1 by its 4-bit code: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; 0-7 positive, 8-15 negative.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [..., G, 16] and scales uint8 [..., G] -> the values [..., G * 32] in dtype."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]: low nibble first
    values = torch.tensor(E2M1_VALUES)[codes].flatten(-2)  # [..., G, 32]
    exponents = scales.to(torch.int32)[..., None] - E8M0_BIAS
    return torch.ldexp(values, exponents).flatten(-2).to(dtype)


def mxfp4_as_int8(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values as integers with group scales, exactly: blocks uint8 [..., G, 16] and scales uint8 [..., G]
    -> (int8 [..., G * 32] holding 2 * e2m1, in -12..12; fp32 [..., G] holding 2^(s - 128))."""
    doubled = torch.tensor([int(2 * v) for v in E2M1_VALUES], dtype=torch.int8)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]: low nibble first
    q = doubled[codes].flatten(-3)
    exponents = scales.to(torch.int32) - E8M0_BIAS - 1
    return q, torch.ldexp(torch.ones(exponents.shape), exponents)


class Mxfp4Config(QuantizationConfig):
    name = "mxfp4"

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> QuantizationConfig:
        if not hf_quant_config:
            raise ValueError("quantization='mxfp4' runs checkpoints whose experts are stored in MXFP4 (gpt-oss's "
                             "quantization_config); plexus does not quantize a full-precision checkpoint to it")
        return cls()

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        return None
