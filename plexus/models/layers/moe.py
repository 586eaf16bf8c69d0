"""Routed experts (a mixture-of-experts MLP), as Mixtral's, Qwen3-MoE's and gpt-oss's sparse blocks compute them.

The router (`gate`) is a LinearLayer hidden -> num_experts (with a bias where the model has one: gpt-oss), so
LoRA reaches it; the experts' weights are stacked as two parameters, `w13` [E, 2I, H] (each expert's gate
rows, then its up rows) and `w2` [E, H, I] (down), with biases `b13` [E, 2I] and `b2` [E, H] where the model
has them, for the platform's `ModelOps.fused_moe`, which routes each token to its top_k experts (in the
model's routing order) and runs each expert once over its tokens with the model's activation (silu, or
gpt-oss's clamped "swigluoai"). Where the quantization config quantizes the experts (a checkpoint quantized per
expert, or `int8` / `w8a8` on load), they load as LinearLayers of its method and are then stacked as integers
(a StackedInt in place of `w13` / `w2`) or dequantized (plexus.models.layers.moe_quant). No LoRA on experts.

Checkpoints store experts one by one (`experts.{e}.gate_proj.weight`, Mixtral's `experts.{e}.w1.weight`, ...)
or already stacked (`experts.gate_up_proj`, `experts.down_proj`, `experts.gate_up_proj_bias`, ...):
transformers' own layout, written by save_pretrained(save_original_format=False), which is [E, 2I, H] with
gate rows then up rows for Mixtral and Qwen3-MoE, but for gpt-oss transposed ([E, H, 2I], down [E, I, H]) with
gate and up interleaved (gate at even positions, up at odd ones), as the model declares (gate_up_interleaved,
stacked_transposed); it is reordered into plexus's one layout as it loads. gpt-oss's hub checkpoints store
the stacked experts in MXFP4 (`experts.gate_up_proj_blocks` / `_scales`, plexus.models.quantization.mxfp4),
dequantized here into the model dtype as they load. The generic loader hands this module all of them through
its `load_checkpoint_tensor` hook (plexus.models.loader)."""
from __future__ import annotations

import torch
from torch import nn

from plexus.models.layers.linear import UNQUANTIZED, LinearBuilder, LinearLayer, WeightDims
from plexus.models.layers.moe_quant import QuantizedExperts, StackedInt, dequantized
from plexus.models.quantization.mxfp4 import dequantize_mxfp4, mxfp4_as_int8

# The activations the experts compute (ModelOps.fused_moe): silu(gate) * up, and gpt-oss's clamped SwiGLU.
ACTIVATIONS = ("silu", "swigluoai")
# The stacked checkpoint tensors (transformers' names, relative to the block) -> the parameter they fill.
STACKED = {"experts.gate_up_proj": "w13", "experts.down_proj": "w2", "experts.gate_up_proj_bias": "b13",
           "experts.down_proj_bias": "b2"}


class FusedMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 linear: LinearBuilder, prefix: str, hidden_act: str = "silu",
                 expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 checkpoint_prefix: str | None = None, *, router_bias: bool = False, expert_bias: bool = False,
                 routing: str = "softmax_topk", swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                 gate_up_interleaved: bool = False, stacked_transposed: bool = False) -> None:
        """renormalize: the top_k weights rescaled to sum 1 (Mixtral always; Qwen3-MoE's norm_topk_prob);
        hidden_act: "silu" or "swigluoai" (gpt-oss's clamp(gate, max=limit) * sigmoid(alpha * gate) *
        (clamp(up, -limit, limit) + 1), with swiglu_alpha and swiglu_limit); expert_names: the checkpoint's names
        of each expert's gate, up and down projections (Mixtral's w1, w3, w2); checkpoint_prefix: this block's
        name in the checkpoint where it is not `prefix` (Mixtral's block_sparse_moe), for the quantization
        config's ignore lists; router_bias, expert_bias: the router's and the experts' projections have biases
        (gpt-oss); routing: the order of top-k and softmax (plexus.models.layers.ops.select_experts:
        "softmax_topk", or gpt-oss's "topk_softmax"); gate_up_interleaved: the checkpoint's stacked gate/up
        tensors alternate gate and up along their 2I dimension (gpt-oss), rather than all gate then all up;
        stacked_transposed: its stacked weights are [E, in, out] (gpt-oss) rather than [E, out, in]."""
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"{prefix}: hidden_act={hidden_act!r}; plexus's experts compute "
                             f"{' or '.join(ACTIVATIONS)}")
        if routing not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"{prefix}: routing={routing!r}; plexus routes by 'softmax_topk' or 'topk_softmax'")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{prefix}: num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}")
        self.prefix = prefix
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate_size = intermediate_size
        self.expert_names = expert_names
        self.activation, self.routing = hidden_act, routing
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
        self.gate_up_interleaved, self.stacked_transposed = gate_up_interleaved, stacked_transposed
        self.ops = linear.ops
        # Unquantized whatever the method, as vLLM's: the routing decision is the part most sensitive to error.
        self.gate = LinearLayer(hidden_size, [num_experts], bias=router_bias, method=UNQUANTIZED, ops=linear.ops)
        self._missing: dict[str, set] = {}
        # The experts as LinearLayers of the quantization method while they load (finish_loading stacks them).
        self.quantized_experts = None
        # gpt-oss's MXFP4 experts, kept as the int8 values 2 * e2m1 with the blocks' scales 2^(s - 128): exact
        self.mxfp4 = linear.quant_config is not None and linear.quant_config.name == "mxfp4"
        self.dims: dict[str, WeightDims] = {}    # (for the worker's cast: the integer scales stay fp32)
        if self.mxfp4:
            for name, rows, cols in (("w13", 2 * intermediate_size, hidden_size), ("w2", hidden_size,
                                                                                  intermediate_size)):
                if cols % 32:
                    raise ValueError(f"{prefix}: MXFP4 experts need input sizes in whole blocks of 32, got {cols}")
                self._set_int(name, torch.empty(num_experts, rows, cols, dtype=torch.int8),
                              torch.empty(num_experts, rows, cols // 32, dtype=torch.float32), None, 8)
            self.w13 = self.w2 = None
            self._missing.update(w13={(e, s) for e in range(num_experts) for s in (0, 1)},
                                 w2={(e, 0) for e in range(num_experts)})
        elif _quantizes_experts(linear.quant_config, checkpoint_prefix or prefix, num_experts, expert_names):
            self.quantized_experts = QuantizedExperts(hidden_size, intermediate_size, num_experts,
                                                      linear.quant_config, linear.ops, checkpoint_prefix or prefix,
                                                      prefix, expert_names)
            self.w13 = self.w2 = None
        else:
            self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
            self._missing.update(w13={(e, s) for e in range(num_experts) for s in (0, 1)},
                                 w2={(e, 0) for e in range(num_experts)})
        if expert_bias:
            self.b13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size), requires_grad=False)
            self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
            self._missing.update(b13={(e, 0) for e in range(num_experts)}, b2={(e, 0) for e in range(num_experts)})
        else:
            self.b13 = self.b2 = None
        self._mxfp4_parts: dict[str, dict[str, torch.Tensor]] = {}  # "experts.down_proj" -> blocks or scales so far

    @property
    def experts_quantized(self) -> bool:
        """Whether the experts are kept as integers (a StackedInt each), or are still loading as quantized layers."""
        return self.quantized_experts is not None or self.w13 is None or self.w2 is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, H] -> [T, H]
        w13, w2 = self._experts()
        return self.ops.fused_moe(x, self.gate(x), w13, w2, self.top_k, self.renormalize, self.b13,
                                  self.b2, self.activation, self.swiglu_alpha, self.swiglu_limit, self.routing)

    def _experts(self) -> tuple[torch.Tensor | StackedInt, torch.Tensor | StackedInt]:
        """(w13, w2): each the dense parameter, or a StackedInt over this module's own integer parameters (made
        per call, so it follows the parameters wherever the platform moves them)."""
        return tuple(getattr(self, name) if getattr(self, name) is not None else StackedInt(
            getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scales"), getattr(self, f"{name}_offsets"),
            getattr(self, f"{name}_bits")) for name in ("w13", "w2"))

    def _set_int(self, name: str, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bits: int) -> None:
        """Expert weights `name` as integers: parameters {name}_qweight, _scales, _offsets (scales kept fp32)."""
        for part, tensor in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
            setattr(self, f"{name}_{part}", None if tensor is None else nn.Parameter(tensor, requires_grad=False))
            if part != "qweight":
                self.dims[f"{name}_{part}"] = WeightDims(None, None, dtype_fixed=True)
        setattr(self, f"{name}_bits", bits)

    def finish_loading(self) -> None:
        """For plexus.models.loader, after every LinearLayer's method has processed its weights: the quantized
        experts stacked (as integers where they can be, else dequantized into the model dtype), their
        per-expert layers dropped."""
        if self.quantized_experts is None:
            return
        w13, w2 = self.quantized_experts.stacked(self.gate.weight.dtype)
        self.quantized_experts = None
        if isinstance(w13, StackedInt) and isinstance(w2, StackedInt):
            for name, form in (("w13", w13), ("w2", w2)):
                self._set_int(name, form.qweight, form.scales, form.offsets, form.bits)
            return
        dense = [w if isinstance(w, torch.Tensor) else dequantized(w, self.gate.weight.dtype) for w in (w13, w2)]
        self.w13, self.w2 = (nn.Parameter(w.contiguous(), requires_grad=False) for w in dense)

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> list[str] | None:
        """For plexus.models.loader: place a checkpoint tensor named relative to this block (`experts.3.w1.weight`,
        `experts.gate_up_proj`, `experts.gate_up_proj_blocks`); returns the parameters it has now filled
        completely, or None for a name that is not one of this block's."""
        parts = name.split(".")
        if name in STACKED and (STACKED[name] in self._missing or self.quantized_experts is not None):
            param = STACKED[name]
            expected = self._shape_of(param)
            if self.stacked_transposed and len(expected) == 3:
                expected = (expected[0], expected[2], expected[1])
            if tensor.shape != expected:
                raise ValueError(f"checkpoint tensor '{self.prefix}.{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected)}")
            tensor = self._stacked_as_plexus(param, tensor)
            if param in ("w13", "w2") and self.quantized_experts is not None:
                for e in range(self.num_experts):
                    self.quantized_experts.load_full_precision(param, e, tensor[e], f"{self.prefix}.{name}")
                return []
            if getattr(self, param) is None:
                raise ValueError(f"checkpoint tensor '{self.prefix}.{name}' holds full-precision experts, but the "
                                 "checkpoint's quantization_config says they are MXFP4 (*_blocks, *_scales)")
            getattr(self, param).data.copy_(tensor)
            return self._mark_filled(param, list(self._missing[param]))
        if name.endswith(("_blocks", "_scales")) and name[:-7] in ("experts.gate_up_proj", "experts.down_proj"):
            return self._load_mxfp4(name[:-7], name[-6:], tensor)
        if (len(parts) >= 4 and parts[0] == "experts" and parts[1].isdigit() and parts[2] in self.expert_names
                and int(parts[1]) < self.num_experts and self.quantized_experts is not None):
            self.quantized_experts.load(int(parts[1]), self.expert_names.index(parts[2]), ".".join(parts[3:]),
                                        tensor, f"{self.prefix}.{name}")
            return []
        if (len(parts) == 4 and parts[0] == "experts" and parts[1].isdigit() and parts[3] == "weight"
                and parts[2] in self.expert_names and int(parts[1]) < self.num_experts):
            e, which = int(parts[1]), self.expert_names.index(parts[2])
            inter = self.intermediate_size
            if which < 2:
                param, dest, pieces = "w13", self.w13.data[e, which * inter:(which + 1) * inter], [(e, which)]
            else:
                param, dest, pieces = "w2", self.w2.data[e], [(e, 0)]
        else:
            return None
        if dest.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor '{self.prefix}.{name}' has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        return self._mark_filled(param, pieces)

    def _stacked_as_plexus(self, param: str, tensor: torch.Tensor) -> torch.Tensor:
        """A stacked checkpoint tensor (weights [E, out, in] or [E, in, out], biases [E, out]) in plexus's layout
        ([E, out, in], gate rows then up rows), from the layout the model declared."""
        if self.stacked_transposed and tensor.dim() == 3:
            tensor = tensor.transpose(1, 2)
        if self.gate_up_interleaved and param in ("w13", "b13"):
            tensor = torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1)
        return tensor

    def _load_mxfp4(self, base: str, part: str, tensor: torch.Tensor) -> list[str]:
        """One half (blocks or scales) of an MXFP4 stacked weight; once both are in, each expert's weight is
        dequantized into the model dtype (one expert at a time, so a real checkpoint's layer never exists in
        fp32 whole). The blocks are [E, out, in / 32, 16] whatever stacked_transposed says (an MX block runs
        along the input dimension), the gate/up rows interleaved where the model's are."""
        parts = self._mxfp4_parts.setdefault(base, {})
        parts[part] = tensor
        if len(parts) < 2:
            return []
        del self._mxfp4_parts[base]
        blocks, scales = parts["blocks"], parts["scales"]
        param = STACKED[base]
        num_experts, rows, cols = self._shape_of(param)  # [E, out, in]
        if (blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or cols % 32
                or tuple(blocks.shape) != (num_experts, rows, cols // 32, 16)
                or tuple(scales.shape) != (num_experts, rows, cols // 32)):
            raise ValueError(f"checkpoint tensors '{self.prefix}.{base}_blocks' {tuple(blocks.shape)} and _scales "
                             f"{tuple(scales.shape)} are not MXFP4 for [{num_experts}, {rows}, {cols}]: expected "
                             f"uint8 [{num_experts}, {rows}, {cols // 32}, 16] and [{num_experts}, {rows}, "
                             f"{cols // 32}]")
        if self.mxfp4:
            for e in range(num_experts):
                q, scale = mxfp4_as_int8(blocks[e], scales[e])  # [out, in], [out, in / 32]
                if self.gate_up_interleaved and param == "w13":
                    q, scale = torch.cat((q[0::2], q[1::2])), torch.cat((scale[0::2], scale[1::2]))
                getattr(self, f"{param}_qweight").data[e].copy_(q)
                getattr(self, f"{param}_scales").data[e].copy_(scale)
            return self._mark_filled(param, list(self._missing[param]))
        dtype = self.gate.weight.dtype
        for e in range(num_experts):
            weight = dequantize_mxfp4(blocks[e], scales[e], dtype)  # [out, in]
            if self.gate_up_interleaved and param == "w13":
                weight = torch.cat((weight[0::2], weight[1::2]))
            if self.quantized_experts is not None:
                self.quantized_experts.load_full_precision(param, e, weight, f"{self.prefix}.{base}_blocks")
            else:
                getattr(self, param).data[e].copy_(weight)
        return [] if self.quantized_experts is not None else self._mark_filled(param, list(self._missing[param]))

    def _shape_of(self, param: str) -> tuple[int, ...]:
        """The shape of w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] or b2 [E, H] in plexus's layout."""
        e, inter, hidden = self.num_experts, self.intermediate_size, self.gate.input_size
        shapes = {"w13": (e, 2 * inter, hidden), "w2": (e, hidden, inter), "b13": (e, 2 * inter), "b2": (e, hidden)}
        return shapes[param]

    def _mark_filled(self, param: str, pieces: list[tuple[int, int]]) -> list[str]:
        missing = self._missing[param]
        was_missing = bool(missing)
        missing.difference_update(pieces)
        if not was_missing or missing:
            return []
        return [f"{param}_qweight", f"{param}_scales"] if getattr(self, param, None) is None else [param]


def _quantizes_experts(quant_config, checkpoint_prefix: str, num_experts: int, names: tuple[str, ...]) -> bool:
    """Whether the quantization config gives any expert projection a method (by their checkpoint names)."""
    if quant_config is None:
        return False
    return any(quant_config.linear_method(expert, [expert]) is not UNQUANTIZED
               for e in range(num_experts) for expert in (f"{checkpoint_prefix}.experts.{e}.{n}" for n in names))
