"""Calibration data and the activations it produces, one decoder layer at a time.

The text is tokenized once and cut into `num_samples` windows of `seq_len` tokens (evenly spaced, so a
short text gives overlapping windows). The decoder layers are then run one by one: `LayerInputs` holds
what enters the current layer (hidden states plus the rotary embeddings and mask the model computed for
them), and `next_inputs` runs the layer, as the method left it, to make the next layer's inputs."""
from __future__ import annotations

import pathlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch

BATCH = 4   # calibration sequences per forward pass (bounds the memory of the activations)


def calibration_ids(tokenizer, path: pathlib.Path, num_samples: int, seq_len: int) -> torch.Tensor:
    """[num_samples, seq_len] token ids from the text file at path."""
    ids = tokenizer(pathlib.Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(f"--calibration {path}: {len(ids)} tokens, fewer than --seq-len {seq_len}; "
                         "pass a longer text or a smaller --seq-len")
    starts = torch.linspace(0, len(ids) - seq_len, num_samples).round().long().tolist()
    return torch.tensor([ids[s:s + seq_len] for s in starts])


@dataclass
class Batch:
    hidden: torch.Tensor    # [batch, seq, hidden]
    kwargs: dict            # what the model passes each decoder layer besides the hidden states


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model, ids: torch.Tensor) -> list[Batch]:
    """What enters decoder layer 0 for each batch of calibration sequences."""
    layer0 = model.model.layers[0]
    caught = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
        caught.append(Batch(hidden, kwargs))
        raise _Stop

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in ids.split(BATCH):
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def run_layer(layer, batches: list[Batch]) -> list[Batch]:
    """The layer's outputs, as the inputs of the next layer."""
    out = []
    for b in batches:
        h = layer(b.hidden, **b.kwargs)
        out.append(Batch(h[0] if isinstance(h, tuple) else h, b.kwargs))
    return out


@contextmanager
def capture_inputs(modules: dict[str, torch.nn.Module], sink):
    """Calls sink(name, x) with the input of each module in `modules` while the block is running."""
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: sink(name, args[0]))
               for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def linears_of(layer) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
