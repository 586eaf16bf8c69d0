"""One linear layer for every projection, with a pluggable LinearMethod.

A LinearLayer is y = x W^T + b over a weight that may be the fusion of several checkpoint tensors (q, k and v
in `qkv_proj`; gate and up in `gate_up_proj`), each a *shard* of its output dimension. What it stores and how
it multiplies is its LinearMethod's business:

- `create_weights` registers the parameters under the checkpoint's own tensor names and shapes (an
  unquantized layer has `weight` [out, in]; a packed 4-bit one would have `qweight`, `qzeros`, `scales`),
  with `register_weight` saying which dimension of each is the output and which the input;
- `load_weight` copies one checkpoint tensor into its shard of a fused parameter (generic, from those dims);
- `process_weights_after_loading` may quantize or repack once everything is loaded, and says what form the
  weight is in where a platform kernel can read it: `layer.int_form` (a PackedInt, 8- or 4-bit integers with
  group scales), as data rather than through hooks;
- `apply(layer, x)` computes the output, bias included, in torch: the method's own path.

Which kernel runs is the platform's decision, made in one place (its ModelOps): an unquantized layer's
apply calls `ModelOps.linear`; a layer with an `int_form` runs `ModelOps.int_linear`, which picks its kernel for
the step's row count or calls the method's apply.

The layer has two hooks for what comes next, both off by default:

- `delta`: an additive per-token term after the base output, y = method(x) + delta(x), computed on the
  unquantized activations x, so it works over any method. LoRA plugs in here (its delta gathers each token's
  adapter by slot index); weights are never merged.
- Tensor parallelism: `parallel="column"` keeps this rank's 1/tp_size of every output shard (so q, k and v
  are each split, and the rank's output is the concatenation of its pieces); `parallel="row"` keeps its
  1/tp_size of the input dimension, and the ranks' outputs sum to the full output (the bias is added on rank
  0 only). Checkpoint tensors are narrowed to the rank's part as they are loaded. The collective that joins
  the ranks' outputs belongs to the executor, not here."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from plexus.models.layers.ops import ModelOps


@dataclass(frozen=True)
class WeightDims:
    """Which dimension of a parameter is the layer's output and which its input (None: neither), and
    how many logical values one stored element packs along the output dimension."""
    output_dim: int | None
    input_dim: int | None
    pack_factor: int = 1
    # One slice per output shard along a leading axis (a per-shard scalar scale, an act-order g_idx: q, k
    # and v each have their own), the slice for shard s at index s; the other dims count after that axis.
    per_shard: bool = False
    # Kept in the dtype the method made it (scales in float32) when the model is cast to its compute dtype.
    dtype_fixed: bool = False


class LinearMethod:
    """How a LinearLayer stores its weight and computes its output. The default is unquantized."""

    # Whether the weight is stored other than as a plain [out, in] tensor in the compute dtype (paths that
    # read raw weights, such as a platform's fused decode step, stand aside for such layers).
    quantized = False

    def create_weights(self, layer: LinearLayer, dtype: torch.dtype) -> None:
        layer.register_weight("weight", torch.empty(layer.local_output_size, layer.local_input_size, dtype=dtype),
                              WeightDims(output_dim=0, input_dim=1))

    def load_weight(self, layer: LinearLayer, name: str, tensor: torch.Tensor, shard: int | None, source: str
                    ) -> bool:
        """A method whose checkpoint tensors do not fit register_weight (names with dots, per-shard state
        objects) takes them here and returns True; the default leaves every tensor to LinearLayer."""
        return False

    def process_weights_after_loading(self, layer: LinearLayer) -> None:
        pass

    def apply(self, layer: LinearLayer, x: torch.Tensor) -> torch.Tensor:
        """The output in torch, bias included (for a layer with an int_form, what ModelOps.int_linear falls
        back to)."""
        return layer.ops.linear(x, layer.weight, layer.bias_for_rank(), layer.packed_weight)


UNQUANTIZED = LinearMethod()


class LinearLayer(nn.Module):
    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, method: LinearMethod | None = None,
                 ops: ModelOps | None = None, parallel: str | None = None, tp_rank: int = 0, tp_size: int = 1,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if parallel not in (None, "column", "row"):
            raise ValueError(f"parallel must be None, 'column' or 'row', got {parallel!r}")
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        self.parallel, self.tp_rank, self.tp_size = parallel, tp_rank, tp_size
        split_out, split_in = (tp_size if parallel == "column" else 1), (tp_size if parallel == "row" else 1)
        for size, what in [(s, "output shard") for s in output_sizes] + [(input_size, "input")]:
            if size % (split_out if what != "input" else split_in):
                raise ValueError(f"tensor parallelism: {what} size {size} is not divisible by tp_size={tp_size}")
        self.local_output_sizes = [s // split_out for s in output_sizes]   # this rank's part of each shard
        self.local_output_size = sum(self.local_output_sizes)
        self.local_input_size = input_size // split_in
        self.method = method or UNQUANTIZED
        self.ops = ops or ModelOps()
        self.dims: dict[str, WeightDims] = {}
        self._loaded: set[tuple[str, int | None]] = set()
        self.method.create_weights(self, dtype or torch.get_default_dtype())
        if bias:
            self.register_weight("bias", torch.empty(self.local_output_size, dtype=dtype), WeightDims(0, None))
        else:
            self.bias = None
        self.packed_weight = None    # a platform's faster layout of `weight` (Platform.finalize_model)
        # The weight as packed integers (plexus.models.quantization.packed.PackedInt), where the method's
        # process_weights_after_loading says it has that form: platform kernels read it.
        self.int_form = None
        self.delta: Callable[[torch.Tensor], torch.Tensor] | None = None

    def register_weight(self, name: str, tensor: torch.Tensor, dims: WeightDims) -> None:
        """For LinearMethod.create_weights: a parameter under the checkpoint's tensor name."""
        self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self.dims[name] = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int_form is not None:
            y = self.ops.int_linear(x, self.int_form, self.bias_for_rank(), self._method_apply)
        else:
            y = self.method.apply(self, x)
        if self.delta is not None:
            y = y + self.delta(x)
        return y

    def _method_apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """ops.silu_and_mul(self(x)) for a gate/up layer (two output shards of one size), which the platform
        may fuse with an integer layer's matmul (ModelOps.int_linear) where no delta is set."""
        sizes = self.local_output_sizes
        if self.int_form is not None and self.delta is None and len(sizes) == 2 and sizes[0] == sizes[1]:
            return self.ops.int_linear(x, self.int_form, self.bias_for_rank(), self._method_apply, silu_and_mul=True)
        return self.ops.silu_and_mul(self(x))

    def bias_for_rank(self) -> torch.Tensor | None:
        """The bias this rank adds: row-parallel ranks' outputs are summed, so only rank 0 adds it."""
        return self.bias if self.parallel != "row" or self.tp_rank == 0 else None

    # ------------------------------------------------------------------ loading

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None, source: str = "") -> None:
        """Copy checkpoint tensor `source` (this layer's parameter `name`, shard `shard` of a fused layer)
        into its place, narrowed to this rank's part. With no shard, a fused layer's tensor is the whole
        layer as the checkpoint stores it fused (Phi-3's qkv_proj and gate_up_proj): each shard gets its part."""
        source = source or name
        if shard is None and len(self.output_sizes) > 1:
            for shard, part in enumerate(self._shard_parts(name, tensor, source)):
                self.load_weight(name, part, shard, source)
            return
        if self.method.load_weight(self, name, tensor, shard, source):
            self._loaded.add((name, shard))
            return
        if name not in self.dims:
            raise ValueError(f"checkpoint tensor {source!r} has no place in this layer (its parameters: "
                             f"{', '.join(self.dims)}); is the checkpoint quantized with another method?")
        if (shard is None) != (len(self.output_sizes) == 1):
            raise ValueError(f"checkpoint tensor {source!r}: shard {shard} of a layer with "
                             f"{len(self.output_sizes)} output shards")
        dims, param = self.dims[name], getattr(self, name)
        if self.parallel == "column" and dims.output_dim is not None:
            size = tensor.shape[dims.output_dim] // self.tp_size
            tensor = tensor.narrow(dims.output_dim, self.tp_rank * size, size)
        elif self.parallel == "row" and dims.input_dim is not None:
            size = tensor.shape[dims.input_dim] // self.tp_size
            tensor = tensor.narrow(dims.input_dim, self.tp_rank * size, size)
        dest = param.data
        if dims.per_shard:
            dest = dest[shard or 0]
        elif shard is not None and dims.output_dim is not None:
            offset = sum(self.local_output_sizes[:shard]) // dims.pack_factor
            size = self.local_output_sizes[shard] // dims.pack_factor
            dest = dest.narrow(dims.output_dim, offset, size)
        if dest.shape != tensor.shape and not (dims.per_shard and dest.numel() == tensor.numel() == 1):
            raise ValueError(f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)} (this rank's part), "
                             f"expected {tuple(dest.shape)}")
        if dest.dtype != tensor.dtype and not (dest.is_floating_point() and tensor.is_floating_point()
                                               and min(dest.element_size(), tensor.element_size()) > 1):
            raise ValueError(f"checkpoint tensor {source!r} has dtype {tensor.dtype}, expected {dest.dtype}")
        dest.copy_(tensor.reshape(dest.shape))
        self._loaded.add((name, shard))

    def _shard_parts(self, name: str, tensor: torch.Tensor, source: str) -> list[torch.Tensor]:
        """A whole fused layer's tensor as the tensors its shards would have had apart: its rows of each shard
        along the output dimension, or, where each shard has its own value (a per-tensor scale, an act-order
        g_idx), the one the whole layer shares, for every shard."""
        dims = self.dims.get(name)
        if dims is None:
            raise ValueError(f"checkpoint tensor {source!r} holds the whole fused layer (output shards "
                             f"{self.output_sizes}), but this layer has no parameter {name!r} to split (its "
                             f"parameters: {', '.join(self.dims) or 'none'}): {type(self.method).__name__} loads "
                             "it only shard by shard, from separate tensors")
        if dims.per_shard:
            slot = list(getattr(self, name).shape[1:])     # one shard's, as a checkpoint of separate shards has it
            if self.parallel == "row" and dims.input_dim is not None:
                slot[dims.input_dim] *= self.tp_size
            if tensor.numel() != 1 and list(tensor.shape) != slot:
                raise ValueError(f"checkpoint tensor {source!r} of shape {tuple(tensor.shape)} holds the whole fused "
                                 f"layer (output shards {self.output_sizes}), but {type(self.method).__name__} keeps "
                                 f"{name!r} per shard, {tuple(slot)} each, and cannot split it")
            return [tensor] * len(self.output_sizes)
        if dims.output_dim is None:
            return [tensor] * len(self.output_sizes)
        sizes = [size // dims.pack_factor for size in self.output_sizes]
        if tensor.dim() <= dims.output_dim or tensor.shape[dims.output_dim] != sum(sizes):
            raise ValueError(f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, expected {sum(sizes)} "
                             f"along dimension {dims.output_dim} (the whole fused layer: output shards "
                             f"{self.output_sizes})")
        return list(tensor.split(sizes, dim=dims.output_dim))

    def mark_optional(self, name: str) -> None:
        """For LinearMethod.create_weights: a parameter a checkpoint may leave out (the method tells which
        shards it got through its load_weight hook; the values of one never loaded are undefined)."""
        shards = [None] if len(self.output_sizes) == 1 else range(len(self.output_sizes))
        self._loaded.update((name, s) for s in shards)

    def missing_weights(self) -> list[str]:
        """The parameters (and shards) no checkpoint tensor has filled yet."""
        shards = [None] if len(self.output_sizes) == 1 else list(range(len(self.output_sizes)))
        return [name if s is None else f"{name}#{s}" for name in self.dims for s in shards
                if (name, s) not in self._loaded]

    def mark_loaded(self, name: str) -> None:
        """For parameters shared with another module (a head tied to the embeddings)."""
        self.mark_optional(name)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_sizes}, bias={self.bias is not None}, "
                f"method={type(self.method).__name__}, parallel={self.parallel}")


class LinearBuilder:
    """Makes a model's LinearLayers, each with the method its quantization config picks for the layer's
    checkpoint names: a fused layer's are its shards' (q_proj, k_proj, v_proj for qkv_proj), from the model's
    packed_modules_mapping."""

    def __init__(self, ops: ModelOps, quant_config, packed_modules_mapping: dict[str, list[str]]) -> None:
        """quant_config: a plexus.models.quantization config, or None for unquantized layers."""
        self.ops, self.quant_config, self.packed = ops, quant_config, packed_modules_mapping

    def __call__(self, prefix: str, input_size: int, output_sizes: list[int], bias: bool) -> LinearLayer:
        method: LinearMethod | None = None
        if self.quant_config is not None:
            parent, _, name = prefix.rpartition(".")
            shards = [f"{parent}.{s}" if parent else s for s in self.packed.get(name, (name,))]
            method = self.quant_config.linear_method(prefix, shards)
        return LinearLayer(input_size, output_sizes, bias, method=method, ops=self.ops)
