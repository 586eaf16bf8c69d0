"""bitsandbytes: 4-bit NF4/FP4 (and 8-bit LLM.int8) weights, quantized and multiplied by the bitsandbytes
library, as vLLM's quantization="bitsandbytes" (load_format="bitsandbytes").

Two ways in, as in vLLM:
- a pre-quantized checkpoint (transformers' save_pretrained with BitsAndBytesConfig; config.json
  quantization_config has quant_method "bitsandbytes"): each projection's `weight` is packed uint8 with its
  state beside it (`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
  `weight.quant_state.bitsandbytes__nf4` JSON), rebuilt with bitsandbytes' own QuantState.from_dict; 8-bit
  checkpoints hold int8 `weight` and per-row `SCB`;
- quantization="bitsandbytes" on an unquantized checkpoint: each weight is quantized as it is read, with
  vLLM's in-flight settings (4-bit NF4, blocksize 64, double quantization); vLLM has no setting to change
  them.

The shards of a fused layer (q, k, v; gate, up) are quantized separately and each has its own state; once
loaded they become one 4-bit matrix with fp32 block scales (double quantization undone, as vLLM does), so
the layer is one matmul. In a bf16 model on a CPU with AVX512-BF16 that matrix is repacked into
bitsandbytes' CPU layout, which its fused bf16 kernel reads (what bitsandbytes' own Linear4bit does at
inference on such CPUs; 4-5x faster than dequantize + matmul at batch 1); otherwise bitsandbytes
dequantizes it to the model dtype for each matmul, so an fp32 model computes in fp32."""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from plexus.models.layers.linear import UNQUANTIZED, LinearLayer, LinearMethod
from plexus.models.quantization.base import QuantizationConfig

QUANT_TYPES = ("nf4", "fp4")
# vLLM's in-flight quantization (its BitsAndBytesModelLoader): NF4, double quantization, bitsandbytes'
# default blocksize.
_INFLIGHT_QUANT_TYPE, _INFLIGHT_DOUBLE_QUANT, _INFLIGHT_BLOCKSIZE = "nf4", True, 64
# bitsandbytes' CPU 4-bit kernel works on blocks of this many output rows (its _convert_weight_packed_for_cpu).
_CPU_BLOCK_N = 32


def import_bitsandbytes():
    """The bitsandbytes module, imported on first use, with an error saying how to install it."""
    # Without the optional `kernels` package bitsandbytes logs, once per process at import, that it could
    # not fetch a faster CPU kernel from the Hugging Face Hub; its bundled kernel is the one used here.
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_log.level
    cpu_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as error:
        raise ImportError("quantization='bitsandbytes' needs the bitsandbytes library: pip install bitsandbytes "
                          f"(or pip install 'plexus[bitsandbytes]'); importing it failed: {error}") from None
    finally:
        cpu_log.setLevel(level)
    # LLM.int8 logs at every matmul that it quantizes activations from fp16; it is how the method works.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
    return bitsandbytes


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


@dataclass(frozen=True)
class BitsAndBytesConfig(QuantizationConfig):
    """The checkpoint's quantization_config fields, with vLLM's defaults where a field is absent."""

    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    llm_int8_threshold: float = 6.0
    ignored: tuple[str, ...] = ()          # llm_int8_skip_modules
    pre_quantized: bool = False            # the checkpoint holds bitsandbytes tensors
    # Quantizing on load: only these module kinds (vLLM's qlora_adapter_name_or_path takes them from the QLoRA
    # adapter's target_modules); empty: every projection. A fused layer is quantized if any shard is named.
    target_modules: tuple[str, ...] = ()
    name = "bitsandbytes"

    def linear_method(self, prefix: str, shard_names: list[str]) -> LinearMethod:
        if self.target_modules and not self.pre_quantized and not any(
                name.rpartition(".")[2] in self.target_modules for name in shard_names):
            return UNQUANTIZED
        return super().linear_method(prefix, shard_names)

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> BitsAndBytesConfig:
        if hf_quant_config is None:
            return cls(bnb_4bit_quant_type=_INFLIGHT_QUANT_TYPE, bnb_4bit_use_double_quant=_INFLIGHT_DOUBLE_QUANT)
        qc = {k: v for k, v in dict(hf_quant_config).items() if v is not None}
        load_in_8bit, load_in_4bit = bool(qc.get("load_in_8bit", False)), bool(qc.get("load_in_4bit", True))
        if load_in_8bit == load_in_4bit:
            raise ValueError(f"bitsandbytes quantization_config: exactly one of load_in_4bit and load_in_8bit must "
                             f"be true, got load_in_4bit={load_in_4bit}, load_in_8bit={load_in_8bit}")
        quant_type = qc.get("bnb_4bit_quant_type", "fp4")
        if not load_in_8bit and quant_type not in QUANT_TYPES:
            raise ValueError(f"bitsandbytes quantization_config: bnb_4bit_quant_type={quant_type!r} is not "
                             f"supported; allowed: {', '.join(QUANT_TYPES)}")
        storage = qc.get("bnb_4bit_quant_storage", "uint8")
        if not load_in_8bit and storage != "uint8":
            raise ValueError(f"bitsandbytes quantization_config: bnb_4bit_quant_storage={storage!r} is not "
                             "supported; allowed: uint8")
        if load_in_8bit and qc.get("llm_int8_has_fp16_weight", False):
            raise ValueError("bitsandbytes quantization_config: llm_int8_has_fp16_weight=True (weights kept in "
                             "fp16 for training) is not supported; allowed: false")
        skip = qc.get("llm_int8_skip_modules") or ()
        if isinstance(skip, str):
            skip = (skip,)
        return cls(load_in_8bit=load_in_8bit, bnb_4bit_quant_type=quant_type,
                   bnb_4bit_use_double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
                   llm_int8_threshold=float(qc.get("llm_int8_threshold", 6.0)), ignored=tuple(skip),
                   pre_quantized=True)

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        """Every projection; the lm_head only where transformers quantized it: it leaves the output
        embeddings alone unless the checkpoint names its own llm_int8_skip_modules (and in-flight
        quantization leaves the head alone, as vLLM does)."""
        if prefix == "lm_head" and not (self.pre_quantized and self.ignored):
            return None
        import_bitsandbytes()    # a missing library fails while the model is built, before loading
        return BitsAndBytesLinearMethod(self)

    def is_ignored(self, name: str) -> bool:
        """vLLM's rule for llm_int8_skip_modules: an entry equal to one part of the module's name ("mlp",
        "q_proj"), or to a leading run of parts ("model.layers.0")."""
        for candidate in (name, f"model.{name}"):
            parts = candidate.split(".")
            prefixes = {".".join(parts[:i + 1]) for i in range(len(parts))}
            if any(entry in parts or entry in prefixes for entry in self.ignored):
                return True
        return False


class BitsAndBytesLinearMethod(LinearMethod):
    """Collects each shard's tensors as they are read (or quantizes the shard's unquantized weight), then
    keeps `weight` (the 4-bit matrix, packed two values a byte, or int8 [N, K]) with `weight_absmax` (fp32 per
    block, or bf16 [K / blocksize, N] in the CPU layout) or `weight_scb` (fp32 per row, 8-bit)."""

    quantized = True

    def __init__(self, config: BitsAndBytesConfig) -> None:
        self.config = config
        # LLM.int8 quantizes activations too (per row, outlier columns kept in fp16).
        self.activations = "int8" if config.load_in_8bit else None

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        # Nothing to register up front: a shard's state (nested or not, its quant type) is known only once its
        # tensors are read; the parameters are made in process_weights_after_loading.
        if layer.tp_size > 1:
            raise ValueError("quantization='bitsandbytes' with tensor_parallel_size > 1 is not supported")
        layer.bnb_shards = {}    # shard -> {tensor name within the layer: tensor}
        # Empty, and cast with the model: what dtype the layer computes in, known once the model is built.
        layer.register_buffer("bnb_compute_dtype", torch.empty(0, dtype=dtype), persistent=False)

    def load_weight(self, layer: LinearLayer, name: str, tensor: torch.Tensor, shard: int | None, source: str
                    ) -> bool:
        if name == "bias":
            return False
        if name != "weight" and not name.startswith("weight.") and name not in ("SCB", "weight_format"):
            return False    # LinearLayer names the tensor that has no place here
        if name == "weight" and not self.config.pre_quantized and not self.config.load_in_8bit:
            # Quantized now, so the full-precision checkpoint is never held in memory all at once.
            if not tensor.is_floating_point():
                raise ValueError(f"quantization='bitsandbytes' quantizes an unquantized checkpoint, but {source!r} "
                                 f"has dtype {tensor.dtype}")
            F = import_bitsandbytes().functional
            tensor, state = F.quantize_4bit(tensor.contiguous(), blocksize=_INFLIGHT_BLOCKSIZE,
                                            compress_statistics=self.config.bnb_4bit_use_double_quant,
                                            quant_type=self.config.bnb_4bit_quant_type)
            layer.bnb_shards.setdefault(shard or 0, {})["state"] = state
        layer.bnb_shards.setdefault(shard or 0, {})[name] = tensor
        return True

    def process_weights_after_loading(self, layer: LinearLayer) -> None:
        bnb = import_bitsandbytes()
        shards = [self._shard_tensors(layer, s) for s in range(len(layer.output_sizes))]
        dtype = layer.bnb_compute_dtype.dtype
        del layer.bnb_shards, layer.bnb_compute_dtype
        if self.config.load_in_8bit:
            self._finish_8bit(layer, shards, bnb)
        else:
            self._finish_4bit(layer, shards, dtype, bnb)

    def _shard_tensors(self, layer: LinearLayer, shard: int) -> dict[str, torch.Tensor]:
        tensors = layer.bnb_shards.get(shard, {})
        need = ["weight"] + (["SCB"] if self.config.load_in_8bit and self.config.pre_quantized else [])
        missing = [n for n in need if n not in tensors]
        if not self.config.load_in_8bit and self.config.pre_quantized and "weight" in tensors:
            if not any(n.startswith("weight.quant_state.bitsandbytes__") for n in tensors):
                missing.append("weight.quant_state.bitsandbytes__<nf4|fp4>")
        if missing:
            what = f"shard {shard} of " if len(layer.output_sizes) > 1 else ""
            raise ValueError(f"bitsandbytes checkpoint: {what}layer {layer.extra_repr()} lacks tensor(s) "
                             f"{', '.join(missing)}")
        return tensors

    # ------------------------------------------------------------------ 4-bit

    def _shard_state_4bit(self, layer: LinearLayer, shard: int, tensors: dict[str, torch.Tensor], bnb):
        """(packed uint8, QuantState with fp32 absmax) of one shard."""
        F = bnb.functional
        rows, cols = layer.local_output_sizes[shard], layer.local_input_size
        weight = tensors["weight"]
        if self.config.pre_quantized:
            if weight.dtype != torch.uint8:
                raise ValueError(f"bitsandbytes checkpoint: a 4-bit weight must be packed uint8, got {weight.dtype} "
                                 f"(shard {shard} of {layer.extra_repr()}); is this module in "
                                 "llm_int8_skip_modules?")
            state = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items()
                                            if k != "weight"}, device=torch.device("cpu"))
        else:
            state = tensors["state"]    # quantized in load_weight
        if tuple(state.shape) != (rows, cols):
            raise ValueError(f"bitsandbytes: shard {shard} of {layer.extra_repr()} has shape {tuple(state.shape)}, "
                             f"expected {(rows, cols)}")
        if state.quant_type not in QUANT_TYPES:
            raise ValueError(f"bitsandbytes checkpoint: quant_type={state.quant_type!r} is not supported; "
                             f"allowed: {', '.join(QUANT_TYPES)}")
        if cols % state.blocksize:
            raise ValueError(f"bitsandbytes: blocksize {state.blocksize} does not divide the input size {cols}")
        absmax = state.absmax
        if state.nested:    # undo double quantization once, not at every matmul
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return weight.reshape(-1), state, absmax.float()

    def _finish_4bit(self, layer: LinearLayer, shards: list[dict[str, torch.Tensor]], dtype: torch.dtype, bnb
                     ) -> None:
        F = bnb.functional
        parts = [self._shard_state_4bit(layer, s, tensors, bnb) for s, tensors in enumerate(shards)]
        first = parts[0][1]
        for _, state, _ in parts[1:]:
            if (state.quant_type, state.blocksize) != (first.quant_type, first.blocksize):
                raise ValueError(f"bitsandbytes checkpoint: the shards of {layer.extra_repr()} differ in quant_type "
                                 f"or blocksize ({first.quant_type}/{first.blocksize} vs "
                                 f"{state.quant_type}/{state.blocksize}); plexus runs them as one fused layer")
        # Rows are whole blocks (cols % blocksize == 0), so the shards' packed bytes and block scales, one after
        # the other, are those of the fused matrix.
        packed = torch.cat([p for p, _, _ in parts])
        shape = torch.Size((layer.local_output_size, layer.local_input_size))
        state = F.QuantState(absmax=torch.cat([a for _, _, a in parts]), shape=shape, code=first.code,
                             blocksize=first.blocksize, quant_type=first.quant_type, dtype=torch.float32)
        if dtype == torch.bfloat16 and _cpu_layout_applies(shape, bnb):
            # One layout only: keeping the plain one as well for long prefills (dequantize + GEMM is 5x faster
            # there) would cost half the memory saved over bf16.
            packed, state = F._convert_weight_packed_for_cpu(packed.reshape(-1, 1), state, _CPU_BLOCK_N)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.weight_absmax = nn.Parameter(state.absmax, requires_grad=False)
        state.absmax = layer.weight_absmax     # the Parameter itself: the platform may move its storage
        layer.bnb_quant_state = state

    # ------------------------------------------------------------------ 8-bit

    def _finish_8bit(self, layer: LinearLayer, shards: list[dict[str, torch.Tensor]], bnb) -> None:
        weights, scales = [], []
        for s, tensors in enumerate(shards):
            weight, scb = tensors["weight"], tensors["SCB"]
            expected = (layer.local_output_sizes[s], layer.local_input_size)
            if weight.dtype != torch.int8 or tuple(weight.shape) != expected or scb.shape != (expected[0],):
                raise ValueError(f"bitsandbytes 8-bit checkpoint: shard {s} of {layer.extra_repr()} has weight "
                                 f"{weight.dtype} {tuple(weight.shape)} and SCB {tuple(scb.shape)}, expected int8 "
                                 f"{expected} and ({expected[0]},)")
            if "weight_format" in tensors and int(tensors["weight_format"]) != 0:
                raise ValueError(f"bitsandbytes 8-bit checkpoint: weight_format={int(tensors['weight_format'])} "
                                 "is not supported; allowed: 0 (row-major)")
            weights.append(weight)
            scales.append(scb.float())
        # LLM.int8 scales each output row on its own, so the fused weight is the shards' rows stacked.
        layer.weight = nn.Parameter(torch.cat(weights).contiguous(), requires_grad=False)
        layer.weight_scb = nn.Parameter(torch.cat(scales), requires_grad=False)
        state = bnb.MatmulLtState()
        state.CB, state.SCB = layer.weight, layer.weight_scb
        state.threshold = self.config.llm_int8_threshold
        state.has_fp16_weights, state.is_training = False, False
        layer.bnb_matmul_state = state

    # ------------------------------------------------------------------ forward

    def dequantize(self, layer: LinearLayer) -> torch.Tensor:
        """The float32 weight [out, in] (for tests and tools)."""
        bnb = import_bitsandbytes()
        if self.config.load_in_8bit:
            return bnb.functional.int8_vectorwise_dequant(layer.weight, layer.weight_scb).float()
        state = layer.bnb_quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # Back to the plain layout; the block scales stay as the kernel reads them, in bf16.
            n, k = state.shape
            packed, _ = bnb.functional._convert_weight_packed_for_cpu_inverse(layer.weight.detach().clone(),
                                                                            copy.copy(state), _CPU_BLOCK_N)
            state = bnb.functional.QuantState(absmax=state.absmax.float().T.reshape(-1), shape=state.shape,
                                              code=state.code, blocksize=state.blocksize,
                                              quant_type=state.quant_type, dtype=torch.float32)
            return bnb.functional.dequantize_4bit(packed.reshape(-1), state).float().reshape(n, k)
        return bnb.functional.dequantize_4bit(layer.weight, state).float()

    def apply(self, layer: LinearLayer, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        if self.config.load_in_8bit:
            out = bnb.matmul(x, layer.weight, state=layer.bnb_matmul_state).to(x.dtype)
        else:
            out = bnb.matmul_4bit(x, layer.weight, layer.bnb_quant_state)   # either layout
        bias = layer.bias_for_rank()
        return out if bias is None else out + bias


def _cpu_layout_applies(shape: torch.Size, bnb) -> bool:
    F = bnb.functional
    return (hasattr(F, "_convert_weight_packed_for_cpu") and F.has_avx512bf16()
            and shape[0] % _CPU_BLOCK_N == 0 and shape[1] % 2 == 0)
