"""Integer weights with group-wise scales and zero points, whatever file format they came from.

AWQ, GPTQ and compressed-tensors' pack-quantized all store the same thing in different packings:
w[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)], with q unsigned `bits`-bit integers, g(k) the group of input
column k (k // group_size, or a checkpoint's act-order `g_idx`), s the scales and z the integer zero points
(2^(bits-1) for symmetric schemes). Each format's method unpacks its tensors into that form (`IntWeight`),
and one matmul serves them all:

- 4 bits: torch's `_weight_int4pack_mm_for_cpu` for bf16/fp16 steps of up to INT4PACK_MAX_ROWS tokens
  (on a GPU, its CUDA tinygemm `_weight_int4pack_mm` for bf16 steps of any length)
  (no full-precision weight is made; each group's zero point folds into its float offset), when the
  layer's rows are a multiple of 16 and the group size is 32/64/128/256 (a per-channel scale is repeated over groups of the largest of those that divides the
  input). An act-order layer whose groups are not contiguous is run with its input columns permuted, so its
  groups become contiguous, per run of shards that share a permutation (q, k and v each have their own).
- 8 bits per channel: `_weight_int8pack_mm` on q - 128 as int8 for steps of up to INT8PACK_MAX_ROWS tokens,
  the zero point folded into a per-row correction x.sum(-1) * s * (128 - z).
- bf16 steps of a few tokens (decode): the platform's kernel for the packed form
  (plexus.models.quantization.packed, ModelOps.int_linear), which both layouts above also keep: the int8
  values as they are, the 4-bit ones a second time in the packed form's nibbles (half a byte per weight
  more, which the longer steps' int4 kernel needs).
- Anything else (longer steps, where those kernels fall far behind a dense matmul, fp32, other layouts):
  the weight dequantized a block of rows at a time, never all at once; layers whose shape fits the packed
  form keep only that form."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plexus.models.quantization import packed
from plexus.models.quantization.packed import PackedInt

INT4PACK_GROUP_SIZES = (256, 128, 64, 32)
# Longest steps the int4 / int8 kernels run (SmolLM2's matmuls, 2 cores, bf16: the int4 kernel takes 1.5 ms
# at 64 rows against 0.5 ms dense plus ~1 ms to dequantize, 11.8 ms at 512 against 1.3 ms; in fp32 it is
# 100x slower than dense, so fp32 always dequantizes).
INT4PACK_MAX_ROWS = 64
INT8PACK_MAX_ROWS = 16
_DEQUANT_ROWS = 1024     # rows dequantized at a time on the fallback path


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32/bits unsigned values each, lowest bits first, along `dim` (as uint8)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    words = packed.movedim(dim, -1)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*words.shape[:-1], words.shape[-1] * per_word)
    return values.to(torch.uint8).movedim(-1, dim)


def contiguous_groups(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The permutation of input columns that makes act-order groups contiguous (None: already are).
    Raises when a group does not have exactly group_size columns (the permuted form needs that)."""
    k = g_idx.numel()
    if torch.equal(g_idx.long(), torch.arange(k) // group_size):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], torch.arange(k) // group_size):
        raise ValueError(f"g_idx does not give every group exactly group_size={group_size} input columns")
    return perm


def _cuda_tinygemm(device: torch.device) -> bool:
    """Whether torch's int4 tinygemm runs on this GPU (bf16 tensor cores: compute capability 8.0+)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


class _Segment(nn.Module):
    """A run of output rows sharing one input permutation, stored for the kernels that run it."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 perm: torch.Tensor | None) -> None:
        super().__init__()
        n, k = q.shape
        self.bits, self.group_size, self.n, self.k = bits, group_size, n, k
        self.perm = None if perm is None else _param(perm)
        self.offsets = None
        int4_group = next((g for g in INT4PACK_GROUP_SIZES if group_size % g == 0 and k % g == 0), None)
        if (bits == 4 and n % 16 == 0 and int4_group is not None and packed.supports(k, int4_group, 4)
                and (not q.is_cuda or (_cuda_tinygemm(q.device) and k % 32 == 0))):
            self.kind = "int4pack"
            repeat = group_size // int4_group
            scales, zeros = scales.repeat_interleave(repeat, 1), zeros.repeat_interleave(repeat, 1)
            self.group_size = int4_group
            if q.is_cuda:   # torch's CUDA tinygemm layout, from two values per byte (even columns high)
                u8 = (q[:, ::2].to(torch.uint8) << 4) | q[:, 1::2].to(torch.uint8)
                inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
                self.qweight = _param(torch._convert_weight_to_int4pack(u8, inner_k_tiles))
            else:
                self.qweight = _param(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            # (q - z) * s = (q - 8) * s + (8 - z) * s: torch's kernel's form, [groups, n, 2]
            self.scales_zeros = _param(torch.stack([scales.T, ((8 - zeros) * scales).T], dim=-1).contiguous())
            form = packed.from_unsigned(q, scales, zeros, 4)   # the decode kernel's form (and dequantize's)
            self.nibbles, self.scales = _param(form.qweight), _param(form.scales)
            self.offsets = None if form.offsets is None else _param(form.offsets)
        elif bits == 8 and group_size == k:
            self.kind = "int8pack"
            self.qweight = _param((q.to(torch.int16) - 128).to(torch.int8))
            self.scales = _param(scales[:, 0].contiguous())
            correction = scales[:, 0] * (128 - zeros[:, 0])    # (q - z) s = (q - 128) s + (128 - z) s
            self.offsets = None if not correction.any() else _param(correction.contiguous())
        elif packed.supports(k, group_size, bits):
            self.kind = "packed"
            form = packed.from_unsigned(q, scales, zeros, bits)
            self.qweight, self.scales = _param(form.qweight), _param(form.scales)
            self.offsets = None if form.offsets is None else _param(form.offsets)
        else:
            self.kind = "dequant"
            self.qweight, self.scales, self.zeros = _param(q), _param(scales), _param(zeros)
        self._cast: dict[torch.dtype, nn.Parameter] = {}
        # This segment's weight in the platform kernels' form (None for the plain dequantize layout); the
        # "packed" kind's own path dequantizes.
        self.form: PackedInt | None = None
        if self.kind in ("int4pack", "int8pack", "packed"):
            self.form = PackedInt(self.nibbles if self.kind == "int4pack" else self.qweight, self.scales,
                                  self.offsets, 4 if self.kind == "int4pack" else self.bits,
                                  dequantizes=self.kind == "packed")

    def _for(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A float parameter in the activations' dtype (the kernels want them to match), cast once."""
        tensor = getattr(self, name)
        if tensor.dtype == dtype:
            return tensor
        key = (name, dtype)
        if key not in self._cast:
            self._cast[key] = tensor.to(dtype)
        return self._cast[key]

    def dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """Float32 weight [n, k] (rows of it) in this segment's column order."""
        rows = rows or slice(None)
        if self.form is not None:
            return packed.dequantize(self.form, rows)
        q, s, z = self.qweight[rows], self.scales[rows], self.zeros[rows]
        return ((q.float() - z.repeat_interleave(self.group_size, 1)) * s.repeat_interleave(self.group_size, 1))

    def forward(self, x: torch.Tensor, ops=None) -> torch.Tensor:
        """ops: the model's ModelOps, which picks the kernel for the packed form (None: torch's paths here)."""
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.form is not None and ops is not None:
            return ops.int_linear(x, self.form, None, self.torch_forward)
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.kind == "int4pack" and x.is_cuda:
            if x.dtype == torch.bfloat16:     # tinygemm on the GPU takes bf16 activations only
                return torch._weight_int4pack_mm(x, self.qweight, self.group_size, self._for("scales_zeros", x.dtype))
        elif self.kind == "int4pack" and x.dtype in (torch.bfloat16, torch.float16) and rows <= INT4PACK_MAX_ROWS:
            return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size,
                                                     self._for("scales_zeros", x.dtype))
        if self.kind == "int8pack":
            if rows <= INT8PACK_MAX_ROWS and not x.is_cuda:
                y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self._for("scales", x.dtype))
            else:   # int8 values are exact in bf16: one cast, the scales after the matmul
                y = F.linear(x, self.qweight.to(x.dtype)) * self._for("scales", x.dtype)
            if self.offsets is not None:
                y = y + x.sum(dim=-1, keepdim=True) * self._for("offsets", x.dtype)
            return y
        outs = [F.linear(x, self.dequantize(slice(r, r + _DEQUANT_ROWS)).to(x.dtype))
                for r in range(0, self.n, _DEQUANT_ROWS)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class IntWeight(nn.Module):
    """q [N, K] unsigned ints (uint8), scales [N, G] and zero points [N, G] (float32), and per output shard
    an optional g_idx [K] giving each input column's group (act-order)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 shard_sizes: list[int], g_idx: list[torch.Tensor | None] | None = None) -> None:
        super().__init__()
        n, k = q.shape
        self.n, self.k, self.bits = n, k, bits
        perms = [None] * len(shard_sizes)
        if g_idx is not None:
            perms = [None if g is None else contiguous_groups(g, group_size) for g in g_idx]
        runs: list[tuple[int, int, torch.Tensor | None]] = []   # (start, end, perm) of shards sharing a perm
        start = 0
        for size, perm in zip(shard_sizes, perms):
            if runs and _same(runs[-1][2], perm):
                runs[-1] = (runs[-1][0], start + size, perm)
            else:
                runs.append((start, start + size, perm))
            start += size
        segments = []
        for a, b, perm in runs:
            qs = q[a:b] if perm is None else q[a:b].index_select(1, perm)
            segments.append(_Segment(qs, scales[a:b].float(), zeros[a:b].float(), bits, group_size, perm))
        self.segments = nn.ModuleList(segments)

    def forward(self, x: torch.Tensor, ops=None) -> torch.Tensor:
        """ops: the model's ModelOps, which picks each segment's kernel (None: torch's paths only)."""
        rows = x.reshape(-1, self.k)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        outs = [segment(rows, ops) for segment in self.segments]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.view(*x.shape[:-1], self.n)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] in the checkpoint's column order (for tests and for tools)."""
        parts = []
        for segment in self.segments:
            w = segment.dequantize()
            if segment.perm is not None:
                w = w[:, torch.argsort(segment.perm)]
            parts.append(w)
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}, bits={self.bits}, kernels={[s.kind for s in self.segments]}"


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class IntWeightMethod:
    """The part of every packed-integer format's LinearMethod that follows unpacking: subclasses (also
    LinearMethods) implement create_weights and unpack; this turns the checkpoint's tensors into an IntWeight
    and runs it."""

    quantized = True
    bits: int
    group_size: int    # -1: one group per row
    prefix: str

    def unpack(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None] | None]:
        """(q [N, K] uint8, scales [N, G], zeros [N, G], per-shard g_idx or None) from the loaded tensors."""
        raise NotImplementedError

    def check_group_size(self, layer) -> int:
        """The group size in columns, after checking it divides this layer's input."""
        k = layer.local_input_size
        if self.group_size in (-1, 0):
            return k
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"{type(self).__name__}: group_size={self.group_size} does not divide the input "
                             f"dimension {k} of layer {self.prefix!r}")
        return self.group_size

    def process_weights_after_loading(self, layer) -> None:
        q, scales, zeros, g_idx = self.unpack(layer)
        group_size = self.check_group_size(layer)
        n, k = layer.local_output_size, layer.local_input_size
        groups = k // group_size
        for what, tensor, shape in (("weight", q, (n, k)), ("scales", scales, (n, groups)),
                                    ("zero points", zeros, (n, groups))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{self.prefix}: unpacked {what} have shape {tuple(tensor.shape)}, expected {shape}")
        if int(q.max()) >= 1 << self.bits:
            raise ValueError(f"{self.prefix}: quantized values exceed {self.bits} bits")
        for name in [name for name in layer.dims if name != "bias"]:
            delattr(layer, name)
        layer.int_weight = IntWeight(q, scales, zeros, self.bits, group_size, layer.local_output_sizes, g_idx)
        # One segment in natural column order is the whole layer's packed form (a platform's fused decode step
        # reads it, and the layer runs through ModelOps.int_linear); permuted segments each run through it.
        segments = layer.int_weight.segments
        if len(segments) == 1 and segments[0].perm is None:
            layer.int_form = segments[0].form

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        y = layer.int_weight(x, None if layer.int_form is not None else layer.ops)
        bias = layer.bias_for_rank()
        return y if bias is None else y + bias

    def dequantize(self, layer) -> torch.Tensor:
        return layer.int_weight.dequantize()
