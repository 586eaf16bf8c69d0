"""The one weight loader: a checkpoint's tensors into a model's layers.

Reading: single or sharded safetensors files in a Hugging Face directory (a GGUF file has been converted into
one by plexus.model_files first). Placing (vLLM's AutoWeightsLoader idea): each tensor's name finds the
LinearLayer it belongs to, through the model's packed_modules_mapping where the checkpoint's module (q_proj) is
a shard of a fused layer (qkv_proj), and the parameter within it, whose name may have dots (bitsandbytes'
"weight.absmax"); any other tensor is a plain parameter of the same name, or else goes to the module on its
path that places its own (`load_checkpoint_tensor`: the fused MoE experts, plexus.models.layers.moe). A
tensor with no place, of the wrong shape, or missing is an error naming it. Every LinearMethod then processes
its layer's weights (except layers whose owner processes them: `processed_by_owner`), and then every module with
a `finish_loading` hook runs it (the quantized experts, processed and stacked one expert at a time)."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Iterator

import safetensors
import torch
from torch import nn

from plexus.models.layers.linear import LinearLayer


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], strip_prefix: str = "",
                 skip_prefixes: Iterable[str] = (), skip_substrs: Iterable[str] = ()) -> None:
    """Every (checkpoint name, tensor) into its place in `model`, which declares `packed_modules_mapping`
    (fused module -> its shards' checkpoint names). strip_prefix comes off each name first; names starting
    with a skip_prefix or containing a skip_substr are not the model's (a tied head, rotary tables)."""
    shard_of = {name: (fused, i) for fused, names in model.packed_modules_mapping.items()
                for i, name in enumerate(names)}
    skip_prefixes, skip_substrs = tuple(skip_prefixes), tuple(skip_substrs)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        name = name.removeprefix(strip_prefix)
        if name.startswith(skip_prefixes) or any(s in name for s in skip_substrs):
            continue
        layer, param_name, shard = _linear_for(modules, shard_of, name)
        if layer is not None:
            layer.load_weight(param_name, tensor, shard, source=name)
        elif name in params:
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        elif (filled := _place_in_module(modules, name, tensor)) is not None:
            loaded.update(filled)
        else:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
    linears = {prefix: m for prefix, m in modules.items() if isinstance(m, LinearLayer)}
    missing = [p for p in params if p.rpartition(".")[0] not in linears and p not in loaded]
    for prefix in sorted(linears):
        missing += [f"{prefix}.{w}" for w in linears[prefix].missing_weights()]
    if missing:
        raise ValueError(f"the checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    for layer in linears.values():
        if not getattr(layer, "processed_by_owner", False):
            layer.method.process_weights_after_loading(layer)
    for module in [m for m in modules.values() if hasattr(m, "finish_loading")]:
        module.finish_loading()


def _linear_for(modules: dict[str, nn.Module], shard_of: dict[str, tuple[str, int]], name: str
                ) -> tuple[LinearLayer | None, str, int | None]:
    """The LinearLayer a checkpoint tensor belongs to, the parameter name within it (which may have dots, as
    bitsandbytes' "weight.absmax"), and its shard of a fused layer."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path, shard = parts[:end], None
        if path[-1] in shard_of:
            fused, shard = shard_of[path[-1]]
            path = path[:-1] + [fused]
        module = modules.get(".".join(path))
        if isinstance(module, LinearLayer):
            return module, ".".join(parts[end:]), shard
    return None, "", None


def _place_in_module(modules: dict[str, nn.Module], name: str, tensor: torch.Tensor) -> list[str] | None:
    """A tensor the rules above do not place, offered to the deepest module on its path that places its own
    (`load_checkpoint_tensor(name within it, tensor)`: the fused experts, which stack per-expert tensors): the
    full names of the parameters it has now filled completely, or None where no module takes it."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        place = getattr(modules.get(prefix), "load_checkpoint_tensor", None)
        if place is not None:
            filled = place(".".join(parts[end:]), tensor)
            return None if filled is None else [f"{prefix}.{p}" for p in filled]
    return None


def iterate_weights(model_dir) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face tensor name, tensor) for every tensor of the checkpoint in `model_dir`."""
    for path in _safetensors_files(pathlib.Path(model_dir)):
        try:
            with safetensors.safe_open(path, framework="pt") as file:
                for name in file.keys():
                    yield name, file.get_tensor(name)
        except (safetensors.SafetensorError, OSError) as error:
            raise ValueError(f"corrupt safetensors file {path}: {error}") from None


def _safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"corrupt safetensors index {index}: {error!r}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(
                f"safetensors index {index} names missing shards: {', '.join(missing)}"
            )
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no safetensors weights in {model_dir}; plexus reads *.safetensors only "
            "(.bin / PyTorch pickle checkpoints are not supported; convert them to safetensors)"
        )
    return files
