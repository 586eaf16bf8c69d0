"""One in-memory form for every 8-bit and 4-bit integer weight with group scales, whatever file it came from,
so that one decode kernel serves them all.

    w[n, k] = v[n, k] * scales[n, g] + offsets[n, g],   g = k // (K // G)

- 8 bits: `qweight` int8 [N, K], v = qweight (per-channel int8, neuron_quant s8, compressed-tensors W8A16,
  GGUF Q8_0 with G = K / 32, GPTQ 8-bit with its zero points folded into the offsets);
- 4 bits: `qweight` uint8 [N, K / 2] in blocks of 64 inputs, byte j of block b holding input 64b + j in its
  low nibble and input 64b + 32 + j in its high one, v = nibble - 8 (AWQ, GPTQ, compressed-tensors W4A16,
  GGUF Q4_0 and Q4_1);
- `scales` fp32 [N, G] (or [N] for one group per row); `offsets` likewise, or None for symmetric formats.

A LinearMethod whose weight has this form says so as data: its process_weights_after_loading sets
`layer.int_form` (the form's tensors are the layer's own parameters, so a platform that moves them, as the
CPU platform's huge-page arena does, moves the form with them). The layer then runs through ModelOps.int_linear,
where the platform picks its kernel for the step's row count (the CPU's VNNI GEMV, which rounds the activations
to int8 per block of 32 inputs; AMX or oneDNN int8 matmuls for W8A8) or calls the method's own torch path."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK = 64          # inputs per 4-bit packing block


@dataclass(frozen=True, eq=False)
class PackedInt:
    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    # The layer rounds its activations to int8 per token (dynamic W8A8): int8 x int8 matmuls may serve it.
    w8a8: bool = False
    # The method's own path dequantizes the weight (GGUF, odd-shaped groups): a platform's integer kernel is
    # worth taking for longer steps than when that path is a fast torch kernel.
    dequantizes: bool = False
    # The platform's repacked copies of the weight (AMX tiles, oneDNN's layout), made on first use.
    layouts: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        n, width = self.qweight.shape
        return n, width if self.bits == 8 else width * 2

    @property
    def group_scales(self) -> torch.Tensor:
        """scales as [N, G]."""
        return self.scales if self.scales.dim() == 2 else self.scales.view(-1, 1)

    @property
    def group_offsets(self) -> torch.Tensor | None:
        return self.offsets if self.offsets is None or self.offsets.dim() == 2 else self.offsets.view(-1, 1)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.group_scales.shape[1]


def supports(k: int, group_size: int, bits: int) -> bool:
    """Whether a layer of k inputs with this group size fits the form (whole 64-blocks; groups of 32 or
    whole blocks)."""
    return bits in (4, 8) and k % BLOCK == 0 and k % group_size == 0 and (group_size == 32 or group_size % BLOCK == 0)


def pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> uint8 [N, K / 2] in the block-of-64 layout above."""
    n, k = v.shape
    blocks = v.reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: uint8 [N, K / 2] -> values 0..15 [N, K]."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def from_unsigned(u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> PackedInt:
    """Unsigned values u [N, K] (uint8) with w = (u - zeros) * scales (zeros [N, G] or None for the midpoint
    2^(bits-1)) -> PackedInt."""
    mid = 1 << (bits - 1)
    scales = scales.float().contiguous()
    offsets = None
    if zeros is not None and bool((zeros != mid).any()):
        offsets = ((mid - zeros.float()) * scales).contiguous()    # (u - z) s = (u - mid) s + (mid - z) s
    if bits == 8:
        q = (u.to(torch.int16) - mid).to(torch.int8).contiguous()
    else:
        q = pack_nibbles(u.to(torch.uint8))
    return PackedInt(q, scales, offsets, bits)


def values(p: PackedInt, rows: slice | None = None) -> torch.Tensor:
    """v (signed) as float32 [n, K] for rows of the weight."""
    rows = rows or slice(None)
    if p.bits == 8:
        return p.qweight[rows].float()
    return unpack_nibbles(p.qweight[rows]).float() - 8


def dequantize(p: PackedInt, rows: slice | None = None) -> torch.Tensor:
    """float32 w [n, K] for rows of the weight."""
    rows = rows or slice(None)
    v = values(p, rows)
    gs = p.group_size
    w = v.view(v.shape[0], -1, gs) * p.group_scales[rows, :, None]
    if p.offsets is not None:
        w += p.group_offsets[rows, :, None]
    return w.view(v.shape[0], -1)
