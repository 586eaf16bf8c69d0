"""Routed experts (a mixture-of-experts MLP), as Mixtral's, Qwen3-MoE's and gpt-oss's sparse blocks compute them.

The router (`gate`) is a LinearLayer hidden -> num_experts (with a bias where the model has one: gpt-oss), so
LoRA reaches it; the experts' weights are stacked as two parameters, `w13` [E, 2I, H] (each expert's gate
rows, then its up rows) and `w2` [E, H, I] (down), with biases `b13` [E, 2I] and `b2` [E, H] where the model
has them, for the platform's `ModelOps.fused_moe`, which routes each token to its top_k experts (in the
model's routing order) and runs each expert once over its tokens with the model's activation (silu, or
gpt-oss's clamped "swigluoai"). Experts are plain weights in the model dtype: no quantization method applies
to them (a configuration whose method would is refused) and no LoRA.

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

from plexus.models.layers.linear import UNQUANTIZED, LinearBuilder, LinearLayer
from plexus.models.quantization.mxfp4 import dequantize_mxfp4

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
        self._refuse_quantized_experts(linear.quant_config, checkpoint_prefix or prefix)
        self.ops = linear.ops
        # Unquantized whatever the method, as vLLM's: the routing decision is the part most sensitive to error.
        self.gate = LinearLayer(hidden_size, [num_experts], bias=router_bias, method=UNQUANTIZED, ops=linear.ops)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self._missing = {"w13": {(e, s) for e in range(num_experts) for s in (0, 1)},
                         "w2": {(e, 0) for e in range(num_experts)}}
        if expert_bias:
            self.b13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size), requires_grad=False)
            self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
            self._missing.update(b13={(e, 0) for e in range(num_experts)}, b2={(e, 0) for e in range(num_experts)})
        else:
            self.b13 = self.b2 = None
        self._mxfp4_parts: dict[str, dict[str, torch.Tensor]] = {}  # "experts.down_proj" -> blocks or scales so far

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, H] -> [T, H]
        return self.ops.fused_moe(x, self.gate(x), self.w13, self.w2, self.top_k, self.renormalize, self.b13,
                                  self.b2, self.activation, self.swiglu_alpha, self.swiglu_limit, self.routing)

    def _refuse_quantized_experts(self, quant_config, checkpoint_prefix: str) -> None:
        if quant_config is None:
            return
        for e in range(self.num_experts):
            for name in self.expert_names:
                expert = f"{checkpoint_prefix}.experts.{e}.{name}"
                if quant_config.linear_method(expert, [expert]) is not UNQUANTIZED:
                    raise ValueError(
                        f"quantization={quant_config.name!r} would quantize the MoE experts ({expert}, ...): plexus "
                        f"does not quantize experts yet; run this model unquantized, or with a checkpoint whose "
                        f"quantization config leaves the experts out")

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> list[str] | None:
        """For plexus.models.loader: place a checkpoint tensor named relative to this block (`experts.3.w1.weight`,
        `experts.gate_up_proj`, `experts.gate_up_proj_blocks`); returns the parameters it has now filled
        completely, or None for a name that is not one of this block's."""
        parts = name.split(".")
        if name in STACKED and getattr(self, STACKED[name]) is not None:
            param = STACKED[name]
            dest = getattr(self, param).data
            expected = dest.transpose(1, 2).shape if self.stacked_transposed and dest.dim() == 3 else dest.shape
            if tensor.shape != expected:
                raise ValueError(f"checkpoint tensor '{self.prefix}.{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected)}")
            dest.copy_(self._stacked_as_plexus(param, tensor))
            return self._mark_filled(param, list(self._missing[param]))
        if name.endswith(("_blocks", "_scales")) and name[:-7] in ("experts.gate_up_proj", "experts.down_proj"):
            return self._load_mxfp4(name[:-7], name[-6:], tensor)
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
        dest = getattr(self, param).data  # [E, out, in]
        num_experts, rows, cols = dest.shape
        if (blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or cols % 32
                or tuple(blocks.shape) != (num_experts, rows, cols // 32, 16)
                or tuple(scales.shape) != (num_experts, rows, cols // 32)):
            raise ValueError(f"checkpoint tensors '{self.prefix}.{base}_blocks' {tuple(blocks.shape)} and _scales "
                             f"{tuple(scales.shape)} are not MXFP4 for [{num_experts}, {rows}, {cols}]: expected "
                             f"uint8 [{num_experts}, {rows}, {cols // 32}, 16] and [{num_experts}, {rows}, "
                             f"{cols // 32}]")
        for e in range(num_experts):
            weight = dequantize_mxfp4(blocks[e], scales[e], dest.dtype)  # [out, in]
            if self.gate_up_interleaved and param == "w13":
                weight = torch.cat((weight[0::2], weight[1::2]))
            dest[e].copy_(weight)
        return self._mark_filled(param, list(self._missing[param]))

    def _mark_filled(self, param: str, pieces: list[tuple[int, int]]) -> list[str]:
        missing = self._missing[param]
        was_missing = bool(missing)
        missing.difference_update(pieces)
        return [param] if was_missing and not missing else []
