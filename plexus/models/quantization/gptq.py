"""gptq: AutoGPTQ / GPTQModel checkpoints, 2/4/8-bit, symmetric or not, with or without act-order.

On disk, per linear: `qweight` int32 [in*bits/32, out] packed along the INPUT dimension (lowest bits first);
`qzeros` int32 [groups, out*bits/32] packed along the output dimension, holding zero - 1 (the v1 format,
`checkpoint_format: "gptq"`) or the zero point itself (`"gptq_v2"`); `scales` fp16 [groups, out]; `g_idx`
int32 [in], each input column's group (a permutation of the groups with `desc_act`). w = (q - z) * s.
The settings come from config.json's quantization_config or quantize_config.json: bits, group_size (-1:
per channel), desc_act, sym, checkpoint_format, and `dynamic`: per-module overrides, keys "+:regex" (or a
bare regex) whose dict overrides bits/group_size for matching modules and "-:regex" leaving them
unquantized."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from plexus.models.layers.linear import UNQUANTIZED, LinearLayer, LinearMethod, WeightDims
from plexus.models.quantization.base import QuantizationConfig
from plexus.models.quantization.int_weight import IntWeightMethod, unpack_int32

BITS = (2, 4, 8)
FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    zeros_minus_one: bool = True          # v1 format
    dynamic: tuple[tuple[str, dict], ...] = field(default=())
    lm_head: bool = False                 # GPTQModel can quantize the head too
    ignored: tuple[str, ...] = ()
    name = "gptq"

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> GPTQConfig:
        if not hf_quant_config:
            raise ValueError("quantization='gptq' loads GPTQ checkpoints; this model has no GPTQ quantization_config "
                             "or quantize_config.json (to make one: plexus quantize MODEL --method gptq --format gptq)")
        c = hf_quant_config
        bits = _bits(c.get("bits", 4), "bits")
        group_size = int(c.get("group_size", 128))
        fmt = str(c.get("checkpoint_format") or c.get("format") or "gptq").lower()
        if fmt not in FORMATS:
            raise ValueError(f"gptq: checkpoint_format={fmt!r} is not supported; supported: {', '.join(FORMATS)}")
        dynamic = c.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ValueError(f"gptq: dynamic must be a mapping of module patterns to overrides, got {dynamic!r}")
        for pattern, override in dynamic.items():
            try:
                re.compile(pattern.split(":", 1)[-1] if pattern[:2] in ("+:", "-:") else pattern)
            except re.error as error:
                raise ValueError(f"gptq: dynamic pattern {pattern!r} is not a regex: {error}") from None
            if not pattern.startswith("-:"):
                if "bits" in override:
                    _bits(override["bits"], f"dynamic[{pattern!r}].bits")
        ignored = tuple(c.get("modules_to_not_convert") or ())
        return cls(bits, group_size, bool(c.get("desc_act", False)), fmt == "gptq",
                   tuple((p, dict(o or {})) for p, o in dynamic.items()), bool(c.get("lm_head", False)), ignored)

    def _override(self, name: str) -> dict | None:
        """None: left unquantized by a "-:" rule; else the settings overridden for module `name`."""
        for pattern, override in self.dynamic:
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
            if any(re.match(regex, c) for c in (name, f"model.{name}")):
                return None if negative else override
        return {}

    def linear_method(self, prefix: str, shard_names: list[str]) -> LinearMethod:
        overrides = [self._override(name) for name in shard_names]
        if any(o != overrides[0] for o in overrides):
            raise ValueError(f"gptq: dynamic gives {', '.join(shard_names)} different settings, which plexus runs "
                             f"as one fused layer {prefix!r}")
        if overrides[0] is None or super().linear_method(prefix, shard_names) is UNQUANTIZED:
            return UNQUANTIZED
        return self._method(prefix, overrides[0])

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        return None if prefix == "lm_head" and not self.lm_head else self._method(prefix, {})

    def _method(self, prefix: str, override: dict) -> LinearMethod:
        bits = _bits(override.get("bits", self.bits), "bits")
        group_size = int(override.get("group_size", self.group_size))
        return GPTQLinearMethod(bits, group_size, self.zeros_minus_one, prefix)


def _bits(value, setting: str) -> int:
    if int(value) not in BITS:
        raise ValueError(f"gptq: {setting}={value} is not supported; supported: {', '.join(map(str, BITS))}")
    return int(value)


class GPTQLinearMethod(IntWeightMethod, LinearMethod):
    def __init__(self, bits: int, group_size: int, zeros_minus_one: bool, prefix: str) -> None:
        self.bits, self.group_size, self.zeros_minus_one, self.prefix = bits, group_size, zeros_minus_one, prefix

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        k, n = layer.local_input_size, layer.local_output_size
        per_word = 32 // self.bits
        groups = k // self.check_group_size(layer)
        if k % per_word or any(size % per_word for size in layer.local_output_sizes):
            raise ValueError(f"gptq: layer {self.prefix!r} ({k} inputs, outputs {layer.local_output_sizes}) does not "
                             f"pack into int32 words of {per_word} {self.bits}-bit values")
        shards = len(layer.output_sizes)
        layer.register_weight("qweight", torch.empty(k // per_word, n, dtype=torch.int32), WeightDims(1, 0))
        layer.register_weight("qzeros", torch.empty(groups, n // per_word, dtype=torch.int32),
                              WeightDims(1, None, pack_factor=per_word))
        layer.register_weight("scales", torch.empty(groups, n, dtype=torch.float32),
                              WeightDims(1, None, dtype_fixed=True))
        # Each shard's own: q, k and v were quantized separately, each with its own act-order.
        # Checkpoints without act-order may leave g_idx out: it then is column // group_size.
        layer.register_weight("g_idx", torch.empty(shards, k, dtype=torch.int32), WeightDims(None, 0, per_shard=True))
        layer.mark_optional("g_idx")
        self.has_g_idx: set[int] = set()

    def load_weight(self, layer: LinearLayer, name: str, tensor: torch.Tensor, shard: int | None, source: str) -> bool:
        if name == "g_idx":
            self.has_g_idx.add(shard or 0)
        return False

    def unpack(self, layer: LinearLayer):
        q = unpack_int32(layer.qweight, self.bits, dim=0).T.contiguous()
        zeros = unpack_int32(layer.qzeros, self.bits, dim=1).float()
        if self.zeros_minus_one:
            zeros += 1
        scales = layer.scales.float()
        g_idx = [g if i in self.has_g_idx else None for i, g in enumerate(layer.g_idx)]
        groups = scales.shape[0]
        for g in g_idx:
            if g is not None and (int(g.min()) < 0 or int(g.max()) >= groups):
                raise ValueError(f"{self.prefix}: g_idx values must lie in [0, {groups}), found "
                                 f"[{int(g.min())}, {int(g.max())}]")
        return q, scales.T, zeros.T, None if all(g is None for g in g_idx) else g_idx
