"""Routed experts (a mixture-of-experts MLP), as Mixtral's and Qwen3-MoE's sparse blocks compute them.

The router (`gate`) is a LinearLayer hidden -> num_experts, so LoRA reaches it; the experts' weights are
stacked as two parameters, `w13` [E, 2I, H] (each expert's gate rows, then its up rows) and `w2` [E, H, I]
(down), for the platform's `ModelOps.fused_moe`, which routes each token to its top_k experts and runs each
expert once over its tokens. Experts are plain weights in the model dtype: no quantization method applies to
them (a configuration whose method would is refused) and no LoRA.

Checkpoints store experts one by one (`experts.{e}.gate_proj.weight`, Mixtral's `experts.{e}.w1.weight`, ...)
or already stacked (`experts.gate_up_proj`, `experts.down_proj`: transformers' own layout, written by
save_pretrained(save_original_format=False)); the generic loader hands this module both through its
`load_checkpoint_tensor` hook (plexus.models.loader)."""
from __future__ import annotations

import torch
from torch import nn

from plexus.models.layers.linear import UNQUANTIZED, LinearBuilder, LinearLayer


class FusedMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 linear: LinearBuilder, prefix: str, hidden_act: str = "silu",
                 expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 checkpoint_prefix: str | None = None) -> None:
        """renormalize: the top_k weights rescaled to sum 1 (Mixtral always; Qwen3-MoE's norm_topk_prob);
        expert_names: the checkpoint's names of each expert's gate, up and down projections (Mixtral's w1, w3,
        w2); checkpoint_prefix: this block's name in the checkpoint where it is not `prefix` (Mixtral's
        block_sparse_moe), for the quantization config's ignore lists."""
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"{prefix}: hidden_act={hidden_act!r}; plexus's experts compute silu(gate) * up only")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{prefix}: num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}")
        self.prefix = prefix
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate_size = intermediate_size
        self.expert_names = expert_names
        self._refuse_quantized_experts(linear.quant_config, checkpoint_prefix or prefix)
        self.ops = linear.ops
        # Unquantized whatever the method, as vLLM's: the routing decision is the part most sensitive to error.
        self.gate = LinearLayer(hidden_size, [num_experts], bias=False, method=UNQUANTIZED, ops=linear.ops)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self._missing = {"w13": {(e, s) for e in range(num_experts) for s in (0, 1)},
                         "w2": {(e, 0) for e in range(num_experts)}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, H] -> [T, H]
        return self.ops.fused_moe(x, self.gate(x), self.w13, self.w2, self.top_k, self.renormalize)

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
        `experts.gate_up_proj`); returns the parameters it has now filled completely, or None for a name that
        is not one of this block's."""
        parts = name.split(".")
        if name == "experts.gate_up_proj":
            param, dest, pieces = "w13", self.w13.data, [(e, s) for e in range(self.num_experts) for s in (0, 1)]
        elif name == "experts.down_proj":
            param, dest, pieces = "w2", self.w2.data, [(e, 0) for e in range(self.num_experts)]
        elif (len(parts) == 4 and parts[0] == "experts" and parts[1].isdigit() and parts[3] == "weight"
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
        missing = self._missing[param]
        was_missing = bool(missing)
        missing.difference_update(pieces)
        return [param] if was_missing and not missing else []
