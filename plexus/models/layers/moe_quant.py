"""Quantized experts: a mixture-of-experts block's experts under a quantization method (plexus.models.layers.moe).

Each expert's gate/up and down projections are first LinearLayers of the method the quantization config picks
for the expert's own checkpoint names (`model.layers.N.mlp.experts.E.gate_proj`, ...), so every format the
dense layers read loads into them with its own tensors and checks (compressed-tensors, AWQ, GPTQ, FP8,
bitsandbytes, and `int8` / `w8a8` quantizing a full-precision checkpoint on load). Once the method has processed
them, the experts are stacked for ModelOps.fused_moe, one tensor per kind over all experts:

- where every expert's weight has the packed integer form (plexus.models.quantization.packed: 8-bit, or 4-bit
  in nibbles, with group scales and offsets) with one shape, as a StackedInt: the integers as stored, which
  the CPU's kernel multiplies without making a full-precision copy;
- otherwise (FP8, bitsandbytes, groups the form does not take) as the experts' weights dequantized into the
  model dtype, once, as they load.

The per-expert layers are then dropped."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plexus.models.layers.linear import LinearLayer
from plexus.models.quantization import packed
from plexus.models.quantization.packed import PackedInt


@dataclass(frozen=True, eq=False)
class StackedInt:
    """Every expert's PackedInt of one projection, stacked: qweight [E, N, K] int8 or [E, N, K / 2] uint8 nibbles,
    scales [E, N, G] fp32, offsets like scales or None."""
    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int

    def expert(self, e: int) -> PackedInt:
        return PackedInt(self.qweight[e], self.scales[e], None if self.offsets is None else self.offsets[e], self.bits)

    def dequantized_expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight [N, K] in `dtype` (what ModelOps.fused_moe's torch path multiplies)."""
        return packed.dequantize(self.expert(e)).to(dtype)

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[2] * (1 if self.bits == 8 else 2)

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[2]


def dequantized(w: StackedInt, dtype: torch.dtype) -> torch.Tensor:
    """Every expert's weight [E, N, K] in `dtype`."""
    return torch.stack([w.dequantized_expert(e, dtype) for e in range(w.num_experts)])


class QuantizedExperts(nn.Module):
    """The experts as LinearLayers while they load: gate_up[e] (output shards gate, up) and down[e]."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, quant_config, ops,
                 checkpoint_prefix: str, plexus_prefix: str, names: tuple[str, str, str]) -> None:
        super().__init__()
        gate, up, down = names
        self.gate_up, self.down = nn.ModuleList(), nn.ModuleList()
        for e in range(num_experts):
            base, ours = f"{checkpoint_prefix}.experts.{e}", f"{plexus_prefix}.experts.{e}"
            method = quant_config.linear_method(f"{ours}.gate_up_proj", [f"{base}.{gate}", f"{base}.{up}"])
            self.gate_up.append(LinearLayer(hidden_size, [intermediate_size] * 2, False, method=method, ops=ops))
            method = quant_config.linear_method(f"{ours}.down_proj", [f"{base}.{down}"])
            self.down.append(LinearLayer(intermediate_size, [hidden_size], False, method=method, ops=ops))
        for layer in (*self.gate_up, *self.down):
            layer.processed_by_owner = True     # stacked() processes each in turn, not the loader

    def load(self, e: int, which: int, name: str, tensor: torch.Tensor, source: str) -> None:
        """Checkpoint tensor `name` (weight, weight_packed, qweight, ...) of expert e's gate (which 0), up (1) or
        down (2) projection."""
        if which < 2:
            self.gate_up[e].load_weight(name, tensor, which, source)
        else:
            self.down[e].load_weight(name, tensor, None, source)

    def load_full_precision(self, param: str, e: int, weight: torch.Tensor, source: str) -> None:
        """Expert e's full-precision weight in plexus's layout (w13: gate rows then up rows; w2), from a stacked
        or MXFP4 checkpoint tensor, for a method that quantizes on load."""
        layer = self.gate_up[e] if param == "w13" else self.down[e]
        if "weight" not in layer.dims or not layer.weight.is_floating_point() or layer.weight.element_size() < 2:
            raise ValueError(f"checkpoint tensor {source!r} holds every expert's full-precision weights, which the "
                             f"quantization method {type(layer.method).__name__} does not read (it quantizes "
                             "per-expert checkpoints); use quantization='int8' or 'w8a8', or no quantization")
        if param == "w13":
            inter = weight.shape[0] // 2
            layer.load_weight("weight", weight[:inter], 0, source)
            layer.load_weight("weight", weight[inter:], 1, source)
        else:
            layer.load_weight("weight", weight, None, source)

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor | StackedInt, torch.Tensor | StackedInt]:
        """(w13, w2), each a StackedInt where every expert has one integer form, else dense in `dtype`. Each
        expert's layer is processed by its method here (the loader leaves them: `processed_by_owner`) and
        emptied once stacked, so only one expert's processed copy exists at a time beside the stack."""
        return _stack(list(self.gate_up), dtype), _stack(list(self.down), dtype)


def _stack(layers: list[LinearLayer], dtype: torch.dtype) -> torch.Tensor | StackedInt:
    num = len(layers)
    stack: StackedInt | torch.Tensor | None = None
    for e, layer in enumerate(layers):
        layer.method.process_weights_after_loading(layer)
        form = layer.int_form
        if stack is None and form is not None:
            offsets = None if form.offsets is None else torch.zeros(num, *form.group_offsets.shape)
            stack = StackedInt(form.qweight.new_empty(num, *form.qweight.shape),
                               torch.empty(num, *form.group_scales.shape), offsets, form.bits)
        if isinstance(stack, StackedInt) and not _fits(stack, form):
            stack = dequantized(StackedInt(stack.qweight[:e], stack.scales[:e],
                                           None if stack.offsets is None else stack.offsets[:e], stack.bits), dtype)
            stack = torch.cat([stack, stack.new_empty(num - e, *stack.shape[1:])])
        if isinstance(stack, StackedInt):
            stack.qweight[e].copy_(form.qweight)
            stack.scales[e].copy_(form.group_scales)
            if form.offsets is not None:
                if stack.offsets is None:
                    stack = StackedInt(stack.qweight, stack.scales, torch.zeros(stack.scales.shape), stack.bits)
                stack.offsets[e].copy_(form.group_offsets)
        else:
            weight = layer.method.dequantize(layer) if hasattr(layer.method, "dequantize") else layer.weight
            if stack is None:
                stack = torch.empty(num, *weight.shape, dtype=dtype)
            stack[e].copy_(weight)
        _release(layer)
    return stack


def _fits(stack: StackedInt, form: PackedInt | None) -> bool:
    return (form is not None and form.bits == stack.bits and form.qweight.shape == stack.qweight.shape[1:]
            and form.qweight.dtype == stack.qweight.dtype and form.group_scales.shape == stack.scales.shape[1:])


def _release(layer: LinearLayer) -> None:
    """Frees a stacked expert's own tensors (the layer itself goes when the block drops it)."""
    for module in layer.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            param.data = param.data.new_empty(0)
    layer.int_form = None
