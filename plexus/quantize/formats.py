"""The checkpoint layouts `plexus quantize` writes, tensor for tensor as their own writers save them.

- compressed-tensors "pack-quantized" (llm-compressor): per linear `weight_packed` int32 [out, in*bits/32]
  (signed values offset by 2^(bits-1), packed along the input dim, low bits first), `weight_scale`
  [out, groups] in the model dtype, `weight_shape` int64 [2], and `weight_zero_point` int32
  [out*bits/32, groups] packed along the output dim (asymmetric). Act order is compressed-tensors'
  actorder "weight" (groups in column order, no g_idx): compressed-tensors 0.19 refuses its former
  "group" order, the one with `weight_g_idx`.
- gptq (AutoGPTQ / GPTQModel checkpoint format v1): `qweight` int32 [in*bits/32, out] packed along the
  input dim, `qzeros` int32 [groups, out*bits/32] holding zero - 1, `scales` fp16 [groups, out], `g_idx`
  int32 [in].
- awq (AutoAWQ GEMM): `qweight` int32 [in, out/8] and `qzeros` int32 [groups, out/8], both packed along
  the output dim in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7]; `scales` fp16 [groups, out]."""
from __future__ import annotations

import json
import pathlib
import shutil

import torch
from safetensors.torch import save_file

from plexus.quantize.config import QuantizeConfig
from plexus.quantize.rtn import QuantizedWeight

# The compressed-tensors release whose layout this writer follows (config.json's "version").
COMPRESSED_TENSORS_VERSION = "0.19.0"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")


def pack_rows(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack values [rows, cols] (unsigned, < 2^bits) along dim 1 into int32 [rows, ceil(cols * bits / 32)]:
    value j of each run of 32/bits goes to bits [bits*k, bits*(k+1)) where k is j's place in `order`
    (default: k = j, low bits first). A ragged last run is padded with zeros."""
    per_int = 32 // bits
    rows, cols = values.shape
    padded = torch.zeros(rows, -(-cols // per_int) * per_int, dtype=torch.int64)
    padded[:, :cols] = values.to(torch.int64)
    runs = padded.reshape(rows, -1, per_int)
    order = order or tuple(range(per_int))
    packed = torch.zeros(rows, runs.shape[1], dtype=torch.int64)
    for slot, j in enumerate(order):
        packed |= runs[:, :, j] << (bits * slot)
    # Reinterpret as two's-complement int32, as numpy's uint32 -> int32 view does for the reference writers.
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


def compressed_tensors_tensors(name: str, qw: QuantizedWeight, cfg: QuantizeConfig,
                               scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out_features, in_features = qw.q.shape
    # The stored integers are (signed value + 2^(bits-1)); with our unsigned q that is q itself.
    tensors = {f"{name}.weight_packed": pack_rows(qw.q, qw.bits),
               f"{name}.weight_scale": qw.scale.to(scale_dtype).contiguous(),
               f"{name}.weight_shape": torch.tensor([out_features, in_features])}
    if not cfg.sym:
        tensors[f"{name}.weight_zero_point"] = pack_rows(qw.zero.t(), qw.bits).t().contiguous()
    return tensors


def gptq_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {f"{name}.qweight": pack_rows(qw.q, qw.bits).t().contiguous(),
            f"{name}.qzeros": pack_rows(qw.zero.t() - 1, qw.bits),
            f"{name}.scales": qw.scale.t().contiguous().to(torch.float16),
            f"{name}.g_idx": qw.g_idx.to(torch.int32)}


def awq_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {f"{name}.qweight": pack_rows(qw.q.t(), qw.bits, AWQ_ORDER),
            f"{name}.qzeros": pack_rows(qw.zero.t(), qw.bits, AWQ_ORDER),
            f"{name}.scales": qw.scale.t().contiguous().to(torch.float16)}


def quantization_config(cfg: QuantizeConfig) -> dict:
    """config.json's quantization_config, with the keys and values each format's writer puts there."""
    group_size = None if cfg.group_size == -1 else cfg.group_size
    if cfg.format == "compressed-tensors":
        weights = {"actorder": "weight" if cfg.act_order else None, "block_structure": None, "dynamic": False,
                   "group_size": group_size, "num_bits": cfg.bits, "observer": "minmax", "observer_kwargs": {},
                   "scale_dtype": None, "strategy": "channel" if group_size is None else "group",
                   "symmetric": cfg.sym, "type": "int", "zp_dtype": None if cfg.sym else "torch.int8"}
        return {"config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                              "output_activations": None, "targets": ["Linear"],
                                              "weights": weights}},
                "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
                "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
                "sparsity_config": {}, "transform_config": {}, "version": COMPRESSED_TENSORS_VERSION}
    if cfg.format == "gptq":
        # AutoGPTQ's keys; GPTQModel 7 names the checkpoint format "format" and the algorithm "method".
        return {"bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.act_order, "sym": cfg.sym,
                "damp_percent": cfg.damp_percent, "true_sequential": True, "static_groups": False,
                "lm_head": False, "checkpoint_format": "gptq", "format": "gptq", "method": "gptq",
                "pack_dtype": "int32", "quant_method": "gptq", "meta": {"quantizer": [f"plexus:{_plexus_version()}"]}}
    # AutoAWQ writes config.json with transformers' names (bits, group_size), not its own (w_bit, q_group_size).
    return {"bits": cfg.bits, "group_size": cfg.group_size, "modules_to_not_convert": None, "quant_method": "awq",
            "version": "gemm", "zero_point": not cfg.sym}


def _plexus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("plexus-llm")
    except PackageNotFoundError:
        return "unknown"


def write_checkpoint(out_dir: pathlib.Path, model_dir: pathlib.Path, hf_config: dict,
                     plain: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                     cfg: QuantizeConfig, storage_dtype: torch.dtype, scale_dtype: torch.dtype) -> None:
    """A complete model directory: config.json with its quantization_config, model.safetensors (the
    quantized linears in the format's tensors, every other tensor as it is in storage_dtype), and the
    tokenizer and generation config of the source model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to(storage_dtype).contiguous() if t.is_floating_point() else t.contiguous()
               for name, t in plain.items()}
    for name, qw in quantized.items():
        if cfg.format == "compressed-tensors":
            tensors.update(compressed_tensors_tensors(name, qw, cfg, scale_dtype))
        elif cfg.format == "gptq":
            tensors.update(gptq_tensors(name, qw))
        else:
            tensors.update(awq_tensors(name, qw))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = dict(hf_config)
    config["quantization_config"] = quantization_config(cfg)
    config["torch_dtype"] = config["dtype"] = str(storage_dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if cfg.format == "gptq":
        (out_dir / "quantize_config.json").write_text(json.dumps(config["quantization_config"], indent=2) + "\n")
    for file in MODEL_FILES:
        if (model_dir / file).is_file():
            shutil.copyfile(model_dir / file, out_dir / file)
