"""Group-wise integer weights, and round-to-nearest (RTN) quantization.

Every method ends in a `QuantizedWeight`: unsigned integers q in [0, 2^bits - 1], one scale and one
integer zero point per (output row, group), and the group of each input column (g_idx), so that

    W_hat[o, i] = scale[o, g_idx[i]] * (q[o, i] - zero[o, g_idx[i]])

Symmetric: scale = absmax / (2^(bits-1) - 1), zero = 2^(bits-1). Asymmetric: the group's [min, max]
(widened to hold 0) spread over the 2^bits levels, with an integer zero point. Scales are rounded to the
dtype the checkpoint stores them in as soon as they are computed, so that GPTQ's error feedback and the
tests see exactly the weight a loader will rebuild."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    q: torch.Tensor         # [out, in] int32 in [0, 2^bits - 1], columns in the layer's own order
    scale: torch.Tensor     # [out, groups] float32 holding values of the storage dtype
    zero: torch.Tensor      # [out, groups] int32 in [0, 2^bits - 1]
    g_idx: torch.Tensor     # [in] int32, the group of each input column
    bits: int
    group_size: int         # columns per group (the input dimension for one group per row)

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scale[:, g] * (self.q - self.zero[:, g]).float()


@dataclass(frozen=True)
class Quantizer:
    bits: int
    sym: bool
    scale_dtype: torch.dtype = torch.float32
    # GPTQ's v1 checkpoints store zero - 1 in `bits` bits, so an asymmetric zero point of 0 cannot be written.
    min_zero: int = 0

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of each row of w [rows, columns]: ([rows], [rows])."""
        if self.sym:
            absmax = w.abs().amax(dim=1)
            scale = absmax / (2 ** (self.bits - 1) - 1)
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
            scale = (hi - lo) / self.maxq
        # An all-zero group quantizes to zero whatever its scale; a tiny one must survive fp16.
        scale = scale.clamp(min=1e-5).to(self.scale_dtype).float()
        if not self.sym:
            zero = torch.round(-lo / scale).clamp(self.min_zero, self.maxq)
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integers of w [rows, ...] for per-row (or broadcastable) scale and zero."""
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def fake_quantize(self, w: torch.Tensor, group_size: int) -> torch.Tensor:
        """w [out, in] rounded to its grid, group by group, as floats (AWQ's searches use this)."""
        out_features, in_features = w.shape
        gs = in_features if group_size == -1 else group_size
        groups = w.reshape(-1, gs)
        scale, zero = self.params(groups)
        scale, zero = scale[:, None], zero[:, None]
        return (scale * (self.quantize(groups, scale, zero) - zero)).reshape(out_features, in_features)


def rtn_quantize(weight: torch.Tensor, quantizer: Quantizer, group_size: int) -> QuantizedWeight:
    """Round each group of weight [out, in] to its nearest grid point."""
    out_features, in_features = weight.shape
    gs = in_features if group_size == -1 else group_size
    groups = weight.float().reshape(out_features, in_features // gs, gs)
    scale, zero = quantizer.params(groups.reshape(-1, gs))
    scale, zero = scale.reshape(out_features, -1), zero.reshape(out_features, -1)
    q = quantizer.quantize(groups, scale[..., None], zero[..., None]).reshape(out_features, in_features)
    g_idx = torch.arange(in_features, dtype=torch.int32) // gs
    return QuantizedWeight(q.to(torch.int32), scale, zero.to(torch.int32), g_idx, quantizer.bits, gs)
