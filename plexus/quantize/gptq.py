"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction
error, H = 2 X X^T / n over the calibration inputs X of that linear. fp32 throughout."""
from __future__ import annotations

import torch

from plexus.quantize.calibration import Batch, capture_inputs, linears_of, run_layer
from plexus.quantize.rtn import QuantizedWeight, Quantizer

BLOCK_SIZE = 128    # columns whose error feedback is applied lazily, as one matrix product
# The linears of a Llama layer in the order their inputs become final: each stage's Hessians are collected
# with the stages before it already quantized (AutoGPTQ's true_sequential).
STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class Hessian:
    """Accumulates X^T X over the inputs a linear sees, batch by batch."""

    def __init__(self, in_features: int):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()     # [tokens, in]
        self.xtx.addmm_(x.t(), x)
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return 2 * self.xtx / max(self.count, 1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, quantizer: Quantizer, group_size: int,
                  act_order: bool = False, damp_percent: float = 0.01, static_groups: bool = False) -> QuantizedWeight:
    """weight [out, in], hessian [in, in]. group_size -1: one group per row. act_order: quantize columns in
    descending diag(H) order; groups are then runs of that order, their scales found as the run is reached,
    and g_idx records each column's group (GPTQ's desc_act). static_groups: groups stay runs of the original
    columns, their scales found from the weight before any error feedback, so g_idx is trivial
    (compressed-tensors' actorder "weight")."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    out_features, columns = W.shape
    gs = columns if group_size == -1 else group_size

    # A column no calibration token ever touched carries no error information: quantize it to zero.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.zeros(out_features, columns // gs)
    zero = torch.zeros(out_features, columns // gs)
    if static_groups:
        groups = W.reshape(out_features, columns // gs, gs).transpose(0, 1).reshape(-1, gs)
        s, z = quantizer.params(groups)
        scale, zero = s.reshape(-1, out_features).t().contiguous(), z.reshape(-1, out_features).t().contiguous()

    perm = torch.arange(columns)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv = _inverse_cholesky(H, damp_percent)

    Q = torch.zeros_like(W)
    # The group of the column at each processing position.
    group_of = (perm // gs) if static_groups else torch.arange(columns) // gs
    for i1 in range(0, columns, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, g = i1 + i, int(group_of[i1 + i])
            if not static_groups and col % gs == 0:
                # The group's scale from its columns as they are now, error feedback included.
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scale[:, g], zero[:, g] = quantizer.params(group)
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            q = quantizer.quantize(w, s, z)
            Q[:, col] = q
            err = (w - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = group_of.to(torch.int32)
    if act_order:   # back to the layer's column order
        inverse = torch.argsort(perm)
        Q, g_idx = Q[:, inverse], g_idx[inverse]
    return QuantizedWeight(Q.to(torch.int32), scale, zero.to(torch.int32), g_idx, quantizer.bits, gs)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp I)^-1: row i holds the shares of column i's rounding error that
    the later columns take. A Hessian that float32 cannot factor gets ten times the dampening (as GPTQModel
    does), up to a fifth of its mean diagonal."""
    mean_diag = torch.mean(torch.diag(H))
    while True:
        try:
            damped = H + damp_percent * mean_diag * torch.eye(H.shape[0])
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            if damp_percent >= 0.2:
                raise
            damp_percent = min(0.2, max(damp_percent, 1e-4) * 10)


@torch.no_grad()
def quantize_layer(layer, batches: list[Batch], quantizer: Quantizer, group_size: int, act_order: bool = False,
                   damp_percent: float = 0.01, static_groups: bool = False) -> dict[str, QuantizedWeight]:
    """GPTQ the linears of one decoder layer in place (their weights become the dequantized ones), stage by
    stage; their integer weights by name."""
    linears = linears_of(layer)
    stages = [[n for n in stage if n in linears] for stage in STAGES]
    stages.append([n for n in linears if not any(n in stage for stage in stages)])
    result = {}
    for stage in filter(None, stages):
        hessians = {name: Hessian(linears[name].in_features) for name in stage}
        with capture_inputs({name: linears[name] for name in stage}, lambda name, x: hessians[name].add(x)):
            run_layer(layer, batches)
        for name in stage:
            weight = linears[name].weight
            qw = gptq_quantize(weight, hessians[name].matrix(), quantizer, group_size, act_order, damp_percent,
                               static_groups)
            weight.data = qw.dequantize().to(weight.dtype)
            result[name] = qw
    return result
