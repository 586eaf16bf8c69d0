"""fp8: float8_e4m3fn weights with float32 scales, as vLLM's `quant_method: "fp8"` checkpoints store them
(and compressed-tensors' float-quantized format, which reuses the method below).

- Per tensor (AutoFP8, llm-compressor for vLLM): `weight` e4m3 [out, in], `weight_scale` a scalar per
  checkpoint tensor (so q, k and v of a fused layer each have theirs); w = q * scale.
- Per channel (compressed-tensors): `weight_scale` [out, 1].
- Block-wise (`weight_block_size: [bn, bk]`, DeepSeek-V3): `weight_scale_inv` [ceil(out/bn), ceil(in/bk)],
  w[n, k] = q[n, k] * scale_inv[n // bn, k // bk] (multiplied, whatever its name says).
- `activation_scheme: "static"`: each tensor's `input_scale`; the activations are rounded to e4m3 on that
  scale (the largest of a fused layer's, as vLLM does) before the matmul. "dynamic": rounded to e4m3 on
  scales computed at each step, amax / 448, per token, or for block-wise weights per token and group of
  `weight_block_size[1]` inputs (vLLM's 1x128 groups). compressed-tensors' dynamic `input_activations` say
  which: strategy "token" (or "tensor", which vLLM also runs per token) or "group" with its group_size.
- quantization="fp8" on an unquantized checkpoint quantizes on load, per output channel; its activations stay
  in the compute dtype (weight only).

The matmul dequantizes a block of rows at a time to the activations' dtype (e4m3 values are exact in bf16),
after rounding the activations as above, except on a platform with an fp8 matmul (ModelOps.fp8_linear: the
CUDA platform's torch._scaled_mm on GPUs of compute capability 8.9+, per-tensor and per-channel weights),
which rounds the activations to e4m3 per token (or on the static scale) as vLLM's GPU kernels do."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from plexus.models.layers.linear import LinearLayer, LinearMethod, WeightDims
from plexus.models.quantization.base import QuantizationConfig

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)   # 448
_ROWS = 1024


@dataclass(frozen=True)
class Fp8Config(QuantizationConfig):
    from_checkpoint: bool = False
    activations: str | None = None      # "static", "dynamic", or None: not quantized (on load)
    block: tuple[int, int] | None = None
    ignored: tuple[str, ...] = ()
    name = "fp8"

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> Fp8Config:
        if not hf_quant_config:
            return cls()    # quantize on load
        c = hf_quant_config
        scheme = c.get("activation_scheme", "dynamic")
        if scheme not in ("static", "dynamic"):
            raise ValueError(f"fp8: activation_scheme={scheme!r} is not supported; supported: static, dynamic")
        block = c.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
                raise ValueError(f"fp8: weight_block_size={block!r} must be two positive integers [rows, columns]")
            if scheme == "static":
                raise ValueError("fp8: activation_scheme='static' with weight_block_size is not a valid combination "
                                 "(block-wise checkpoints quantize activations dynamically)")
            block = (int(block[0]), int(block[1]))
        ignored = tuple(c.get("ignored_layers") or c.get("modules_to_not_convert") or ())
        return cls(True, scheme, block, ignored)

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        if prefix == "lm_head":
            return None
        if not self.from_checkpoint:
            return Fp8LinearMethod(prefix, "online")
        if self.block is not None:
            # vLLM's activation groups for block-wise weights: per token and block of inputs (1x128).
            return Fp8LinearMethod(prefix, "block", block=self.block, activations=self.activations,
                                   activation_group=self.block[1])
        return Fp8LinearMethod(prefix, "tensor", activations=self.activations)


class Fp8LinearMethod(LinearMethod):
    """strategy: "tensor" (a scalar weight_scale per shard), "channel" ([out, 1]), "block" (weight_scale_inv
    per block) or "online" (quantize a full-precision weight after loading, per channel); activations:
    "static" (`input_scale`), "dynamic" (per token, or per token and activation_group inputs) or None."""

    quantized = True

    def __init__(self, prefix: str, strategy: str, block: tuple[int, int] | None = None,
                 activations: str | None = None, activation_group: int | None = None,
                 block_scale_name: str = "weight_scale_inv") -> None:
        """activation_group: dynamic activations' scales per token and this many inputs (None: per token).
        block_scale_name: vLLM's fp8 checkpoints call block scales weight_scale_inv, compressed-tensors
        weight_scale."""
        if activations not in ("static", "dynamic", None):
            raise ValueError(f"fp8: activations={activations!r}; supported: static, dynamic, None")
        self.prefix, self.strategy, self.block, self.activations = prefix, strategy, block, activations
        self.static_activations = activations == "static"
        self.activation_group = activation_group
        self.block_scale_name = block_scale_name

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        n, k, shards = layer.local_output_size, layer.local_input_size, len(layer.output_sizes)
        if self.strategy == "online":
            super().create_weights(layer, dtype)
            return
        layer.register_weight("weight", torch.empty(n, k, dtype=torch.float8_e4m3fn), WeightDims(0, 1, dtype_fixed=True))
        if self.strategy == "tensor":
            layer.register_weight("weight_scale", torch.empty(shards, dtype=torch.float32),
                                  WeightDims(None, None, per_shard=True, dtype_fixed=True))
        elif self.strategy == "channel":
            layer.register_weight("weight_scale", torch.empty(n, 1, dtype=torch.float32), WeightDims(0, None, dtype_fixed=True))
        else:
            bn, bk = self.block
            cols = math.ceil(k / bk)
            # Each shard's blocks start at its own first row: one [ceil(rows/bn), cols] slice per shard.
            rows = max(math.ceil(size / bn) for size in layer.local_output_sizes)
            layer.register_weight(self.block_scale_name, torch.empty(shards, rows, cols, dtype=torch.float32),
                                  WeightDims(None, 1, per_shard=True, dtype_fixed=True))
            self._shard_rows = [math.ceil(size / bn) for size in layer.local_output_sizes]
        if self.static_activations:
            layer.register_weight("input_scale", torch.empty(shards, dtype=torch.float32),
                                  WeightDims(None, None, per_shard=True, dtype_fixed=True))

    def load_weight(self, layer: LinearLayer, name: str, tensor: torch.Tensor, shard: int | None, source: str) -> bool:
        if name != self.block_scale_name or self.strategy != "block":
            return False
        scales = getattr(layer, name)
        rows = self._shard_rows[shard or 0]
        expected = (rows, scales.shape[2])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, expected {expected} "
                             f"(weight_block_size={list(self.block)})")
        scales.data[shard or 0, :rows].copy_(tensor)
        return True

    def process_weights_after_loading(self, layer: LinearLayer) -> None:
        if self.strategy == "online":
            w = layer.weight.detach().float()
            scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            layer.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
            layer.row_scale = nn.Parameter(scale, requires_grad=False)
            return
        sizes = layer.local_output_sizes
        if self.strategy == "tensor":
            scale = torch.cat([s.expand(size) for s, size in zip(layer.weight_scale, sizes)])
        elif self.strategy == "channel":
            scale = layer.weight_scale[:, 0]
        else:
            bn, bk = self.block
            block_scales = getattr(layer, self.block_scale_name)
            parts = [block_scales[i, :rows].repeat_interleave(bn, 0)[:size]
                     for i, (rows, size) in enumerate(zip(self._shard_rows, sizes))]
            scale = torch.cat(parts)       # [N, ceil(K / bk)]: rows expanded, columns expanded per block of rows
            delattr(layer, self.block_scale_name)
        if not torch.isfinite(scale).all() or bool((scale <= 0).any()):
            raise ValueError(f"{self.prefix}: fp8 weight scales must be positive and finite")
        layer.row_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
        if self.strategy in ("tensor", "channel"):
            del layer.weight_scale
        if self.static_activations:
            layer.input_scale_max = nn.Parameter(layer.input_scale.max().reshape(()), requires_grad=False)
            del layer.input_scale

    def dequantize(self, layer: LinearLayer, rows: slice | None = None) -> torch.Tensor:
        rows = rows or slice(None)
        scale = layer.row_scale[rows]
        w = layer.weight[rows].float()
        if scale.dim() == 1:
            return w * scale[:, None]
        return w * scale.repeat_interleave(self.block[1], 1)[:, :w.shape[1]]

    def apply(self, layer: LinearLayer, x: torch.Tensor) -> torch.Tensor:
        if layer.row_scale.dim() == 1 and self.activation_group is None:   # the platform's fp8 matmul, or below
            return layer.ops.fp8_linear(x, layer.weight, layer.row_scale, layer.bias_for_rank(),
                                        layer.input_scale_max if self.static_activations else None,
                                        partial(self.dequantizing_apply, layer))
        return self.dequantizing_apply(layer, x)

    def dequantizing_apply(self, layer: LinearLayer, x: torch.Tensor) -> torch.Tensor:
        """The activations rounded as the checkpoint says, times the weight dequantized a slice at a time."""
        if self.static_activations:
            s = layer.input_scale_max
            x = ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).to(x.dtype)
        elif self.activations == "dynamic":
            x = round_to_e4m3_per_group(x, self.activation_group or x.shape[-1])
        n = layer.weight.shape[0]
        outs = [F.linear(x, self.dequantize(layer, slice(r, r + _ROWS)).to(x.dtype)) for r in range(0, n, _ROWS)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        bias = layer.bias_for_rank()
        return y if bias is None else y + bias


def round_to_e4m3_per_group(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., K] rounded to e4m3 on one scale per token and group of `group` inputs (group = K: per token),
    scale = amax(|x|) / 448, and returned dequantized in x's dtype. A last group shorter than `group` gets
    its own scale (zero padding changes no amax)."""
    k = x.shape[-1]
    groups = F.pad(x.float(), (0, -k % group)).unflatten(-1, (-1, group))      # [..., ceil(K / group), group]
    scale = (groups.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).flatten(-2)[..., :k].to(x.dtype)
