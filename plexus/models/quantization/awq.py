"""awq: AutoAWQ's GEMM checkpoints (4-bit, group-wise, with zero points).

On disk, per linear: `qweight` int32 [in, out/8] and `qzeros` int32 [in/group, out/8], eight 4-bit values
per word packed along the OUTPUT dimension in AWQ's order (word bits 4i..4i+3 hold column 8c + [0, 2, 4, 6,
1, 3, 5, 7][i]); `scales` fp16 [in/group, out]; zero points stored as they are. w = (q - z) * s.
quantization_config: {"quant_method": "awq", "bits"/"w_bit": 4, "group_size"/"q_group_size", "zero_point":
true, "version": "gemm", "modules_to_not_convert": [...]}."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from plexus.models.layers.linear import LinearLayer, LinearMethod, WeightDims
from plexus.models.quantization.base import QuantizationConfig
from plexus.models.quantization.int_weight import IntWeightMethod, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)     # word nibble i holds column AWQ_ORDER[i] of its eight
_UNDO_ORDER = torch.argsort(torch.tensor(AWQ_ORDER))


def _setting(config: dict, *names, default=None):
    for name in names:
        if name in config and config[name] is not None:
            return config[name]
    return default


@dataclass(frozen=True)
class AWQConfig(QuantizationConfig):
    bits: int = 4
    group_size: int = 128
    ignored: tuple[str, ...] = ()
    name = "awq"

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> AWQConfig:
        if not hf_quant_config:
            raise ValueError("quantization='awq' loads AWQ checkpoints; this model has no AWQ quantization_config "
                             "(to make one: plexus quantize MODEL --method awq --format awq)")
        bits = int(_setting(hf_quant_config, "bits", "w_bit", default=4))
        if bits != 4:
            raise ValueError(f"awq: bits={bits} is not supported; AWQ GEMM checkpoints are 4-bit")
        version = str(_setting(hf_quant_config, "version", default="gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq: version={version!r} is not supported; plexus reads AutoAWQ's 'gemm' layout")
        if not _setting(hf_quant_config, "zero_point", default=True):
            raise ValueError("awq: zero_point=false is not supported; AWQ GEMM checkpoints carry zero points")
        group_size = int(_setting(hf_quant_config, "group_size", "q_group_size", default=128))
        ignored = tuple(_setting(hf_quant_config, "modules_to_not_convert", default=()) or ())
        return cls(bits, group_size, ignored)

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        return None if prefix == "lm_head" else AWQLinearMethod(self.group_size, prefix)


class AWQLinearMethod(IntWeightMethod, LinearMethod):
    bits = 4

    def __init__(self, group_size: int, prefix: str) -> None:
        self.group_size, self.prefix = group_size, prefix

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        k, n = layer.local_input_size, layer.local_output_size
        groups = k // self.check_group_size(layer)
        if any(size % 8 for size in layer.local_output_sizes):
            raise ValueError(f"awq: layer {self.prefix!r} has output sizes {layer.local_output_sizes}, not multiples "
                             "of the 8 values an int32 packs")
        layer.register_weight("qweight", torch.empty(k, n // 8, dtype=torch.int32), WeightDims(1, 0, pack_factor=8))
        layer.register_weight("qzeros", torch.empty(groups, n // 8, dtype=torch.int32), WeightDims(1, None, 8))
        layer.register_weight("scales", torch.empty(groups, n, dtype=torch.float32),
                              WeightDims(1, None, dtype_fixed=True))

    def unpack(self, layer: LinearLayer):
        def columns(packed: torch.Tensor) -> torch.Tensor:   # [rows, n/8] -> [rows, n] in column order
            values = unpack_int32(packed, 4, dim=1)
            return values.view(values.shape[0], -1, 8)[:, :, _UNDO_ORDER].reshape(values.shape[0], -1)
        q = columns(layer.qweight).T.contiguous()
        zeros = columns(layer.qzeros).T.float()
        return q, layer.scales.T.float(), zeros, None
