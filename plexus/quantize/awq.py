"""AWQ (Lin et al., 2023), as AutoAWQ runs it on a Llama decoder layer.

Weights that meet large activations matter most. For each group of linears that share an input, search
per-input-channel scales s = x_mean^alpha (x_mean: the mean |activation| of each channel, alpha on a grid
over [0, 1)) that minimise the error of the block's output when the linears are quantized as Q(W * s) / s;
multiply the linears' weights by s and divide the operation before them (a norm, or a linear's output
rows) by s, which leaves the float model unchanged. Then search, per group of weights, how far to clip
the weight range (AutoAWQ's auto_clip), and round to nearest."""
from __future__ import annotations

from collections.abc import Callable

import torch

from plexus.quantize.calibration import Batch, capture_inputs, linears_of, run_layer
from plexus.quantize.rtn import QuantizedWeight, Quantizer, rtn_quantize

GRID = 20               # alphas 0, 1/20, ..., 19/20
CLIP_GRID, MAX_SHRINK = 20, 0.5     # clip ranges 1, 0.95, ..., 0.55 of each group's absmax
CLIP_TOKENS = 512       # calibration tokens the clip search looks at
SEARCH_TOKENS = 4096    # calibration tokens whose block output the scale search compares (x_mean uses all)
NO_CLIP = ("q_proj", "k_proj")      # their errors are smoothed by softmax; AutoAWQ leaves them unclipped

Block = Callable[[torch.Tensor, dict], torch.Tensor]


def scale_groups(layer) -> list[tuple[torch.nn.Module, list[str], Block]]:
    """(operation before, linears scaled together, the block whose output is compared) of a Llama layer."""
    attn, mlp = layer.self_attn, layer.mlp

    def attention(x, kwargs):
        return attn(hidden_states=x, position_embeddings=kwargs["position_embeddings"],
                    attention_mask=kwargs.get("attention_mask"))[0]

    groups = [(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], attention)]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:   # v's output rows are o's input channels
        groups.append((attn.v_proj, ["self_attn.o_proj"], lambda x, kw: attn.o_proj(x)))
    groups.append((layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], lambda x, kw: mlp(x)))
    groups.append((mlp.up_proj, ["mlp.down_proj"], lambda x, kw: mlp.down_proj(x)))
    return groups


@torch.no_grad()
def search_scale(block: Block, linears: list[torch.nn.Linear], xs: list[torch.Tensor], kwargs: list[dict],
                 quantizer: Quantizer, group_size: int) -> torch.Tensor:
    """The per-input-channel scale [in] of the grid point with the smallest block output error."""
    in_features = xs[0].shape[-1]
    tokens = sum(x.numel() // in_features for x in xs)
    x_mean = sum(x.abs().reshape(-1, in_features).sum(0) for x in xs) / tokens
    # 20 block forwards per group dominate AWQ's time: compare the outputs on a spread of batches only.
    step = -(-tokens // SEARCH_TOKENS)
    xs, kwargs = xs[::step], kwargs[::step]
    reference = [block(x, kw) for x, kw in zip(xs, kwargs)]
    originals = [lin.weight.data.clone() for lin in linears]
    best_error, best_scale = float("inf"), None
    for step in range(GRID):
        s = x_mean.pow(step / GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for lin, w in zip(linears, originals):
            lin.weight.data = quantizer.fake_quantize(w * s, group_size) / s
        error = sum((block(x, kw) - ref).pow(2).sum().item() for x, kw, ref in zip(xs, kwargs, reference))
        if error < best_error:
            best_error, best_scale = error, s
    for lin, w in zip(linears, originals):
        lin.weight.data = w
    return best_scale


@torch.no_grad()
def search_clip(weight: torch.Tensor, xs: list[torch.Tensor], quantizer: Quantizer, group_size: int) -> torch.Tensor:
    """weight [out, in] clipped group by group to the range (a shrink of its absmax) whose quantized
    output on a sample of calibration tokens is closest to the float output."""
    out_features, in_features = weight.shape
    gs = in_features if group_size == -1 else group_size
    x = torch.cat([x.reshape(-1, in_features) for x in xs])
    x = x[::max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS].reshape(-1, in_features // gs, gs)  # [tokens, groups, gs]
    w = weight.reshape(out_features, -1, gs)                                                      # [out, groups, gs]
    reference = torch.einsum("tgk,ogk->otg", x, w)
    absmax = w.abs().amax(dim=-1, keepdim=True)
    best_max, best_error = absmax.clone(), torch.full(absmax.shape[:2], float("inf"))
    for step in range(int(MAX_SHRINK * CLIP_GRID)):
        limit = absmax * (1 - step / CLIP_GRID)
        clipped = torch.clamp(w, -limit, limit)
        q = quantizer.fake_quantize(clipped.reshape(out_features, in_features), gs).reshape(w.shape)
        error = (torch.einsum("tgk,ogk->otg", x, q) - reference).pow(2).mean(dim=1)       # [out, groups]
        better = error < best_error
        best_error[better], best_max[better] = error[better], limit[better]
    return torch.clamp(w, -best_max, best_max).reshape(out_features, in_features)


@torch.no_grad()
def quantize_layer(layer, batches: list[Batch], quantizer: Quantizer, group_size: int,
                   clip: bool = True) -> dict[str, QuantizedWeight]:
    """Scale, clip and quantize the linears of one decoder layer in place; their integer weights by name."""
    linears = linears_of(layer)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    with capture_inputs(linears, lambda name, x: inputs[name].append(x)):
        run_layer(layer, batches)
    kwargs = [b.kwargs for b in batches]

    for prev, names, block in scale_groups(layer):
        group = [linears[n] for n in names]
        s = search_scale(block, group, inputs[names[0]], kwargs, quantizer, group_size)
        for name, lin in zip(names, group):
            lin.weight.mul_(s)
            inputs[name] = [x / s for x in inputs[name]]
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s[:, None])
            if prev.bias is not None:
                prev.bias.div_(s)
        else:
            prev.weight.div_(s)

    result = {}
    for name, lin in linears.items():
        if clip and not name.endswith(NO_CLIP):
            lin.weight.data = search_clip(lin.weight.data, inputs[name], quantizer, group_size)
        result[name] = rtn_quantize(lin.weight.data, quantizer, group_size)
    return result
