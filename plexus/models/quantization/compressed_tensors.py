"""compressed-tensors: llm-compressor's checkpoints (and LLMC's `save_vllm` export, which writes the same
keys under config.json's `compression_config`, with fp16 scales, no `weight_shape`, symmetric only).

quantization_config: {"quant_method": "compressed-tensors", "format": ..., "config_groups": {name: {"targets":
[...], "weights": {num_bits, type, symmetric, strategy, group_size, actorder, ...}, "input_activations":
{...} | null, "format": ...}}, "ignore": [...], "kv_cache_scheme": null}. A layer takes the first group
whose targets ("Linear", an exact or trailing module name, or "re:<regex>") match it, unless `ignore`d.

Formats, per linear:
- pack-quantized (W4A16, W8A16): `weight_packed` int32 [out, in*bits/32], values + 2^(bits-1), lowest bits
  first; `weight_scale` [out, in/group] (or [out, 1] per channel); `weight_shape` [2]; asymmetric adds
  `weight_zero_point` [out*bits/32, groups] packed along dim 0; act-order adds `weight_g_idx` [in].
- int-quantized / naive-quantized (W8A8, W8A16): int8 `weight`, `weight_scale` [out, 1] or per tensor;
  activations dynamic per token, static per tensor (`input_scale`), or not quantized.
- float-quantized (FP8): float8_e4m3fn `weight`, `weight_scale`, activations as above."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from plexus.models.layers.linear import UNQUANTIZED, LinearLayer, LinearMethod, WeightDims
from plexus.models.quantization.base import QuantizationConfig
from plexus.models.quantization.fp8 import Fp8LinearMethod
from plexus.models.quantization.int8 import Int8LinearMethod
from plexus.models.quantization.int_weight import IntWeightMethod, unpack_int32

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "dense")


@dataclass(frozen=True)
class Scheme:
    """One config group: what its targets are and how their weights and activations are stored."""
    name: str
    targets: tuple[str, ...]
    format: str
    weights: dict
    activations: dict | None


@dataclass(frozen=True)
class CompressedTensorsConfig(QuantizationConfig):
    schemes: tuple[Scheme, ...] = ()
    ignored: tuple[str, ...] = ()
    name = "compressed-tensors"

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> CompressedTensorsConfig:
        if not hf_quant_config:
            raise ValueError("quantization='compressed-tensors' loads llm-compressor checkpoints; this model has no "
                             "quantization_config (to make one: plexus quantize MODEL --format compressed-tensors)")
        c = hf_quant_config
        if c.get("kv_cache_scheme"):
            raise ValueError("compressed-tensors: kv_cache_scheme (a quantized KV cache) is not supported")
        sparsity = c.get("sparsity_config") or {}
        if sparsity and sparsity.get("format", "dense") != "dense":
            raise ValueError(f"compressed-tensors: sparsity_config format {sparsity.get('format')!r} is not supported")
        groups = c.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors: quantization_config has no config_groups")
        schemes = tuple(_scheme(name, group, c.get("format")) for name, group in groups.items())
        return cls(schemes, tuple(c.get("ignore") or ()))

    def _scheme(self, name: str) -> Scheme | None:
        if self.is_ignored(name):
            return None
        for scheme in self.schemes:
            if any(_targets(t, name) for t in scheme.targets):
                return scheme
        return None

    def linear_method(self, prefix: str, shard_names: list[str]) -> LinearMethod:
        schemes = [self._scheme(name) for name in shard_names]
        if any(s != schemes[0] for s in schemes):
            raise ValueError(f"{self.name}: {', '.join(shard_names)} fall in different config groups or ignore "
                             f"entries, but plexus runs them as one fused layer {prefix!r}")
        return UNQUANTIZED if schemes[0] is None else _method(schemes[0], prefix)

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        scheme = self._scheme(prefix)
        return None if scheme is None else _method(scheme, prefix)


def _targets(target: str, name: str) -> bool:
    if target == "Linear":
        return True
    candidates = (name, f"model.{name}")
    if target.startswith("re:"):
        return any(re.match(target[3:], c) for c in candidates)
    return any(c == target or c.endswith("." + target) for c in candidates)


def _scheme(name: str, group: dict, default_format: str | None) -> Scheme:
    where = f"compressed-tensors: config_groups[{name!r}]"
    weights = group.get("weights")
    fmt = group.get("format") or default_format or ("pack-quantized" if weights else "dense")
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    if not weights:
        raise ValueError(f"{where} quantizes no weights; plexus runs weight-quantized schemes only")
    kind, bits = weights.get("type", "int"), int(weights.get("num_bits", 0))
    strategy = weights.get("strategy", "tensor")
    if kind == "float":
        if bits != 8:
            raise ValueError(f"{where}: float weights with num_bits={bits} are not supported; supported: 8 (FP8)")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"{where}: FP8 weight strategy {strategy!r} is not supported; supported: tensor, "
                             "channel, block")
    elif kind == "int":
        allowed = (4, 8) if fmt == "pack-quantized" else (8,)
        if bits not in allowed:
            raise ValueError(f"{where}: num_bits={bits} is not supported for {fmt}; supported: "
                             f"{', '.join(map(str, allowed))}")
        allowed_strategies = ("group", "channel") if fmt == "pack-quantized" else ("channel", "tensor")
        if strategy not in allowed_strategies:
            raise ValueError(f"{where}: weight strategy {strategy!r} is not supported for {fmt}; supported: "
                             f"{', '.join(allowed_strategies)}")
        if strategy == "group" and not weights.get("group_size"):
            raise ValueError(f"{where}: strategy 'group' needs a group_size")
    else:
        raise ValueError(f"{where}: weight type {kind!r} is not supported; supported: int, float")
    activations = group.get("input_activations")
    if activations:
        if not activations.get("symmetric", True):
            raise ValueError(f"{where}: asymmetric input activations are not supported")
        if int(activations.get("num_bits", 8)) != 8:
            raise ValueError(f"{where}: input activations of {activations.get('num_bits')} bits are not supported")
        if kind == "int" and fmt == "pack-quantized":
            raise ValueError(f"{where}: pack-quantized weights with quantized activations are not supported")
        # Static: one input_scale per tensor; dynamic: per token, as vLLM runs "tensor" and "token" alike, or
        # (FP8 only) per token and group_size inputs.
        a_strategy = activations.get("strategy", "tensor")
        dynamic = activations.get("dynamic", True)
        allowed = (("tensor", "token", "group") if kind == "float" else ("tensor", "token")) if dynamic else ("tensor",)
        if a_strategy not in allowed:
            raise ValueError(f"{where}: {'dynamic' if dynamic else 'static'} input activations by {a_strategy!r} "
                             f"are not supported for {kind} weights; supported: {', '.join(allowed)}")
        if a_strategy == "group" and not activations.get("group_size"):
            raise ValueError(f"{where}: input activations by 'group' need a group_size")
    targets = tuple(group.get("targets") or ())
    if not targets:
        raise ValueError(f"{where} has no targets")
    return Scheme(name, targets, fmt, dict(weights), dict(activations) if activations else None)


def _method(scheme: Scheme, prefix: str) -> LinearMethod:
    w, a = scheme.weights, scheme.activations
    activations = None if a is None else ("dynamic" if a.get("dynamic", True) else "static")
    if w.get("type", "int") == "float":
        block = tuple(w.get("block_structure") or ()) or None
        # Dynamic activations: per token, or per token and group_size inputs (FP8_BLOCK's 1x128).
        group = None
        if activations == "dynamic" and a.get("strategy") == "group":
            group = int(a.get("group_size") or 0) or None
        return Fp8LinearMethod(prefix, w.get("strategy", "tensor"), block=block, activations=activations,
                               activation_group=group, block_scale_name="weight_scale")
    if scheme.format in ("int-quantized", "naive-quantized"):
        return Int8LinearMethod(prefix, weights=w.get("strategy", "tensor"), activations=activations)
    group_size = int(w.get("group_size") or -1) if w.get("strategy") == "group" else -1
    return PackedLinearMethod(int(w["num_bits"]), group_size, bool(w.get("symmetric", True)), prefix)


class PackedLinearMethod(IntWeightMethod, LinearMethod):
    """pack-quantized: int32-packed weights, group-wise or per-channel scales, optional zero points and g_idx."""

    def __init__(self, bits: int, group_size: int, symmetric: bool, prefix: str) -> None:
        self.bits, self.group_size, self.symmetric, self.prefix = bits, group_size, symmetric, prefix

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        n, k, shards = layer.local_output_size, layer.local_input_size, len(layer.output_sizes)
        per_word = 32 // self.bits
        groups = k // self.check_group_size(layer)
        if k % per_word:
            raise ValueError(f"compressed-tensors: layer {self.prefix!r} has {k} inputs, not a multiple of the "
                             f"{per_word} {self.bits}-bit values an int32 packs")
        layer.register_weight("weight_packed", torch.empty(n, k // per_word, dtype=torch.int32), WeightDims(0, 1))
        layer.register_weight("weight_scale", torch.empty(n, groups, dtype=torch.float32),
                              WeightDims(0, 1, dtype_fixed=True))
        if not self.symmetric:
            if any(size % per_word for size in layer.local_output_sizes):
                raise ValueError(f"compressed-tensors: layer {self.prefix!r} output sizes {layer.local_output_sizes} "
                                 f"do not pack into int32 zero points of {per_word} values")
            layer.register_weight("weight_zero_point", torch.empty(n // per_word, groups, dtype=torch.int32),
                                  WeightDims(0, 1, pack_factor=per_word))
        # Optional: LLMC's export has no weight_shape; g_idx only with act-order.
        layer.register_weight("weight_g_idx", torch.empty(shards, k, dtype=torch.int32),
                              WeightDims(None, 0, per_shard=True))
        layer.mark_optional("weight_g_idx")
        self.has_g_idx: set[int] = set()

    def load_weight(self, layer: LinearLayer, name: str, tensor: torch.Tensor, shard: int | None, source: str) -> bool:
        if name == "weight_zero_point" and self.symmetric:
            return True     # some writers save a symmetric scheme's (implied) zero points too
        if name == "weight_shape":
            tensor = tensor.to(torch.int64)      # saved as int32 by some versions
            expected = (layer.output_sizes[shard or 0], layer.input_size)
            if tensor.numel() != 2 or tuple(tensor.tolist()) != expected:
                raise ValueError(f"checkpoint tensor {source!r} says the weight is {tensor.tolist()}, but the model "
                                 f"config makes it {list(expected)}")
            return True
        if name == "weight_g_idx":
            self.has_g_idx.add(shard or 0)
            if tensor.dtype != torch.int32:
                layer.load_weight(name, tensor.to(torch.int32), shard, source)
                return True
        return False

    def unpack(self, layer: LinearLayer):
        offset = 1 << (self.bits - 1)
        q = unpack_int32(layer.weight_packed, self.bits, dim=1)
        if self.symmetric:
            zeros = torch.full(layer.weight_scale.shape, float(offset))
        else:
            zeros = unpack_int32(layer.weight_zero_point, self.bits, dim=0).float()
        g_idx = [g if i in self.has_g_idx else None for i, g in enumerate(layer.weight_g_idx)]
        return q, layer.weight_scale.float(), zeros, None if all(g is None for g in g_idx) else g_idx
