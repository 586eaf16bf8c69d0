"""gguf: llama.cpp's block-quantized weights, kept in their GGUF blocks in memory.

A GGUF file run with quantization="gguf" is converted (plexus.model_files.gguf, quantized mode) into a
directory whose linear weights are the file's raw bytes: `<module>.qweight` uint8 [out, bytes per row] and
`<module>.qweight_type` int32 (the GGMLQuantizationType), with quantization_config {"quant_method": "gguf"}.
Q8_0, Q4_0 and Q4_1 layers are repacked once at load into the packed integer form
(plexus.models.quantization.packed: the same values, in the layout the CPU platform's decode kernel reads);
other types keep their bytes. Either way a step too long for the kernel dequantizes a chunk of rows at a time
(CHUNK_ELEMENTS values) and multiplies it, so no full-precision copy of a weight exists at any time. The dequantizers are vectorized
torch over ggml's block layouts and give exactly gguf.quants.dequantize's float32 values.

A fused layer (qkv, gate_up) may get shards of different types (Q4_K_M files mix Q4_K and Q6_K): its rows
are stored as consecutive groups, each of one type. Embeddings stay dequantized (the converter writes them
as float), and so does an lm_head tied to them (the converter lists it in modules_to_not_convert)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from plexus.models.layers.linear import LinearLayer, LinearMethod, WeightDims
from plexus.models.quantization import packed
from plexus.models.quantization.base import QuantizationConfig
from plexus.models.quantization.packed import PackedInt

# How many weight values one dequantized chunk holds (512 KiB in fp32: it stays in cache for its matmul).
CHUNK_ELEMENTS = 1 << 17

_QK_K = 256   # values per K-quant super-block


# Each dequantizer maps blocks uint8 [n, type size] to float32 [n, block size]. The bit fields are cut from
# contiguous copies and the arithmetic runs in place on the one float32 result: strided uint8 ops and
# broadcasting out-of-place ops are several times slower on CPU. The float32 operations are gguf-py's, in
# its order, so the values are bit for bit the same.


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].view(torch.float16).float()


def _bytes(blocks: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return blocks[:, start:end].contiguous()


def _shifts(like: torch.Tensor, *values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, b] -> uint8 [n, 2b]: the low nibbles, then the high ones (ggml's order within a block)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 4] (a little-endian uint32) -> its 32 bits as uint8 [n, 32], bit 0 first."""
    return ((qh[:, :, None] >> _shifts(qh, *range(8))) & 1).reshape(qh.shape[0], 32)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:   # [n, 18]: d, 16 bytes of nibbles
    return _nibbles(_bytes(blocks, 2, 18)).float().sub_(8).mul_(_half(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:   # [n, 20]: d, m, 16 bytes of nibbles
    return _nibbles(_bytes(blocks, 4, 20)).float().mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:   # [n, 22]: d, 4 bytes of high bits, 16 bytes of nibbles
    q = _nibbles(_bytes(blocks, 6, 22)) | (_bits32(_bytes(blocks, 2, 6)) << 4)
    return q.float().sub_(16).mul_(_half(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:   # [n, 24]: d, m, 4 bytes of high bits, 16 bytes of nibbles
    q = _nibbles(_bytes(blocks, 8, 24)) | (_bits32(_bytes(blocks, 4, 8)) << 4)
    return q.float().mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:   # [n, 34]: d, 32 int8
    return _bytes(blocks, 2, 34).view(torch.int8).float().mul_(_half(blocks, 0))


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes at 4..16 -> the 8 sub-blocks' scales d * sc and mins dmin * m, float32
    [n, 8, 1] each (the 6-bit sc and m packed as in ggml's get_scale_min_k4)."""
    scales = _bytes(blocks, 4, 16)
    d, m, low = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (low & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return (_half(blocks, 0) * sc.float())[:, :, None], (_half(blocks, 2) * mins.float())[:, :, None]


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> uint8 [n, 8, 32]: each 32 bytes hold two sub-blocks, low nibbles first."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> _shifts(qs, 0, 4)[:, None]) & 0x0F).reshape(n, 8, 32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:   # [n, 144]: d, dmin, 12 bytes of scales, 128 of nibbles
    d, dm = _k_scales(blocks)
    q = _k_low_nibbles(_bytes(blocks, 16, 144))
    return q.float().mul_(d).sub_(dm).reshape(-1, _QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:   # [n, 176]: d, dmin, scales, 32 bytes of high bits, nibbles
    n = blocks.shape[0]
    d, dm = _k_scales(blocks)
    qh = (_bytes(blocks, 16, 48).reshape(n, 1, 32) >> _shifts(blocks, *range(8))[:, None]) & 1   # [n, 8, 32]
    q = _k_low_nibbles(_bytes(blocks, 48, 176)) | (qh << 4)
    return q.float().mul_(d).sub_(dm).reshape(n, _QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:   # [n, 210]: 128 bytes low 4 bits, 64 high 2 bits, 16 scales, d
    n = blocks.shape[0]
    ql = ((_bytes(blocks, 0, 128).reshape(n, 2, 1, 64) >> _shifts(blocks, 0, 4)[:, None]) & 0x0F)
    qh = ((_bytes(blocks, 128, 192).reshape(n, 2, 1, 32) >> _shifts(blocks, 0, 2, 4, 6)[:, None]) & 3)
    q = ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)
    d = (_half(blocks, 208) * _bytes(blocks, 192, 208).view(torch.int8).float())[:, :, None]   # [n, 16, 1]
    return q.reshape(n, 16, 16).float().sub_(32).mul_(d).reshape(n, _QK_K)


_DEQUANTIZERS = {
    GGMLQuantizationType.F32: lambda b: b.view(torch.float32),
    GGMLQuantizationType.F16: lambda b: b.view(torch.float16).float(),
    GGMLQuantizationType.BF16: lambda b: b.view(torch.bfloat16).float(),
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_DEQUANTIZERS)

# Types whose blocks map exactly onto the packed integer form (their bits), repacked once at load.
_PACKABLE = {GGMLQuantizationType.Q8_0: 8, GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4}
PACKABLE_TYPES = tuple(_PACKABLE)


def repack(data: torch.Tensor, ggml_type: int) -> PackedInt:
    """uint8 rows [N, bytes per row] of Q8_0, Q4_0 or Q4_1 blocks -> the same weights as a PackedInt (groups of
    32, each block's fp16 d the group's scale; Q4_1's min m becomes the offset m + 8 d of v = nibble - 8).
    packed.dequantize of the result equals dequantize() of the blocks (the products of fp16 values and small
    integers are exact in fp32, except Q4_1's offset, rounded once)."""
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][1]
    rows = data.shape[0]
    blocks = data.reshape(-1, type_size)
    d = _half(blocks, 0).reshape(rows, -1)
    if ggml_type == GGMLQuantizationType.Q8_0:
        q = _bytes(blocks, 2, 34).view(torch.int8).reshape(rows, -1)
        return PackedInt(q.contiguous(), d.contiguous(), None, 8)
    start = 2 if ggml_type == GGMLQuantizationType.Q4_0 else 4
    nibbles = packed.pack_nibbles(_nibbles(_bytes(blocks, start, start + 16)).reshape(rows, -1))
    if ggml_type == GGMLQuantizationType.Q4_0:
        return PackedInt(nibbles, d.contiguous(), None, 4)
    m = _half(blocks, 2).reshape(rows, -1)
    return PackedInt(nibbles, d.contiguous(), (m + 8 * d).contiguous(), 4)


def type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown ggml type {ggml_type}"


def row_bytes(ggml_type: int, row_length: int) -> int:
    """Bytes of one row of `row_length` values; ValueError if the row is not whole blocks."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if row_length % block_size:
        raise ValueError(f"a row of {row_length} values is not a whole number of {type_name(ggml_type)} blocks "
                         f"of {block_size}")
    return row_length // block_size * type_size


def dequantize(data: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """uint8 [rows, bytes per row] in ggml type `ggml_type` -> float32 [rows, values per row], the values
    gguf.quants.dequantize gives."""
    if ggml_type not in _DEQUANTIZERS:
        raise ValueError(f"ggml type {type_name(ggml_type)} is not supported; supported: "
                         f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][1]
    rows = data.shape[0]
    blocks = data.reshape(-1, type_size)   # [rows * blocks per row, type_size]
    return _DEQUANTIZERS[ggml_type](blocks).reshape(rows, -1)


@dataclass(frozen=True)
class GGUFConfig(QuantizationConfig):
    ignored: tuple[str, ...] = ()
    name = "gguf"

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> GGUFConfig:
        if not hf_quant_config or hf_quant_config.get("quant_method") != "gguf":
            raise ValueError("quantization='gguf' runs GGUF files, keeping their quantized blocks: pass "
                             "model=path/to/model.gguf (this model is not a GGUF file)")
        return cls(tuple(hf_quant_config.get("modules_to_not_convert") or ()))

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        return GGUFLinearMethod()


@dataclass(frozen=True)
class RowGroup:
    """Consecutive output rows of one ggml type, at byte `offset` of the layer's flat `qweight`."""
    ggml_type: int
    rows: int
    offset: int
    row_bytes: int


class GGUFLinearMethod(LinearMethod):
    """Loads each shard's `qweight` (raw GGUF rows) and `qweight_type`, then keeps all of the layer's rows
    in one flat uint8 `qweight` with `gguf_groups` saying where each run of one type lies."""

    quantized = True

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        # Rows arrive per shard and their width depends on the type, so they wait in `gguf_rows` until
        # process_weights_after_loading; the empty qweight holds the name for missing_weights.
        layer.register_weight("qweight", torch.empty(0, dtype=torch.uint8), WeightDims(output_dim=0, input_dim=1))
        layer.register_weight("qweight_type", torch.empty(len(layer.output_sizes), dtype=torch.int32),
                              WeightDims(None, None, per_shard=True))
        layer.gguf_rows = {}
        layer.gguf_groups = ()
        layer.gguf_packed = None     # bits when the rows were repacked into the packed integer form

    def load_weight(self, layer: LinearLayer, name: str, tensor: torch.Tensor, shard: int | None, source: str
                    ) -> bool:
        if name != "qweight":
            return False
        if tensor.dtype != torch.uint8 or tensor.dim() != 2:
            raise ValueError(f"checkpoint tensor {source!r}: GGUF rows must be uint8 [rows, bytes per row], got "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        layer.gguf_rows[shard or 0] = (tensor, source)
        return True

    def process_weights_after_loading(self, layer: LinearLayer) -> None:
        types = layer.qweight_type.tolist()
        groups: list[RowGroup] = []
        pieces = []
        offset = 0
        for shard, (rows, source) in sorted(layer.gguf_rows.items()):
            ggml_type = types[shard]
            if ggml_type not in _DEQUANTIZERS:
                raise ValueError(f"GGUF tensor {source!r} has type {type_name(ggml_type)}, which "
                                 f"quantization='gguf' does not run (it runs "
                                 f"{', '.join(t.name for t in SUPPORTED_TYPES)}); leave quantization unset "
                                 "to run the file dequantized")
            rows = self._rank_part(layer, rows, shard, ggml_type, source)
            width = rows.shape[1]
            if groups and groups[-1].ggml_type == ggml_type:
                last = groups[-1]
                groups[-1] = RowGroup(ggml_type, last.rows + rows.shape[0], last.offset, width)
            else:
                groups.append(RowGroup(ggml_type, rows.shape[0], offset, width))
            pieces.append(rows.reshape(-1))
            offset += rows.numel()
        layer.qweight = nn.Parameter(torch.cat(pieces), requires_grad=False)
        layer.gguf_groups = tuple(groups)
        layer.gguf_rows = {}
        layer.gguf_packed = None
        if len(groups) == 1 and groups[0].ggml_type in _PACKABLE and packed.supports(layer.local_input_size, 32,
                                                                                     _PACKABLE[groups[0].ggml_type]):
            form = repack(layer.qweight.view(groups[0].rows, groups[0].row_bytes), groups[0].ggml_type)
            layer.qweight = nn.Parameter(form.qweight, requires_grad=False)
            layer.gguf_scales = nn.Parameter(form.scales, requires_grad=False)
            layer.gguf_offsets = None if form.offsets is None else nn.Parameter(form.offsets, requires_grad=False)
            layer.gguf_packed = form.bits
            layer.gguf_groups = ()
            # The platform's integer kernel reads it; this method's own path dequantizes.
            layer.int_form = PackedInt(layer.qweight, layer.gguf_scales, layer.gguf_offsets, form.bits,
                                       dequantizes=True)

    @staticmethod
    def _rank_part(layer: LinearLayer, rows: torch.Tensor, shard: int, ggml_type: int, source: str
                   ) -> torch.Tensor:
        """This rank's rows (column parallel) or whole blocks of each row (row parallel), checked against the
        layer's shape."""
        full_out = layer.output_sizes[shard]
        try:
            expected = (full_out, row_bytes(ggml_type, layer.input_size))
            if layer.parallel == "row":
                row_bytes(ggml_type, layer.local_input_size)   # each rank's part must be whole blocks too
        except ValueError as error:
            raise ValueError(f"GGUF tensor {source!r}: {error}") from None
        if tuple(rows.shape) != expected:
            raise ValueError(f"GGUF tensor {source!r} ({type_name(ggml_type)}) has {tuple(rows.shape)} bytes, "
                             f"expected {expected} for {full_out} rows of {layer.input_size} values")
        if layer.parallel == "column":
            size = layer.local_output_sizes[shard]
            rows = rows[layer.tp_rank * size:(layer.tp_rank + 1) * size]
        elif layer.parallel == "row":
            size = expected[1] // layer.tp_size
            rows = rows[:, layer.tp_rank * size:(layer.tp_rank + 1) * size]
        return rows.contiguous()

    def apply(self, layer: LinearLayer, x: torch.Tensor) -> torch.Tensor:
        in_features = layer.local_input_size
        x2 = x.reshape(-1, in_features)   # [tokens, in]
        step = max(1, CHUNK_ELEMENTS // in_features)
        pieces = []
        form = layer.int_form
        if form is not None:
            for start in range(0, form.shape[0], step):
                weight = packed.dequantize(form, slice(start, start + step)).to(x.dtype)
                pieces.append(F.linear(x2, weight))
        for group in layer.gguf_groups:
            data = layer.qweight[group.offset:group.offset + group.rows * group.row_bytes]
            data = data.view(group.rows, group.row_bytes)
            for start in range(0, group.rows, step):
                weight = dequantize(data[start:start + step], group.ggml_type).to(x.dtype)   # [chunk, in]
                pieces.append(F.linear(x2, weight))
        out = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        out = out.view(*x.shape[:-1], layer.local_output_size)
        bias = layer.bias_for_rank()
        return out if bias is None else out + bias

    def dequantize(self, layer: LinearLayer) -> torch.Tensor:
        """The float32 weight [out, in] (for tests and tools)."""
        if layer.int_form is not None:
            return packed.dequantize(layer.int_form)
        return torch.cat([dequantize(layer.qweight[g.offset:g.offset + g.rows * g.row_bytes].view(g.rows, g.row_bytes),
                                     g.ggml_type) for g in layer.gguf_groups])
