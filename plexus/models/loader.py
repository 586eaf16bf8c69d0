"""Reading a checkpoint's weights: single or sharded safetensors files in a Hugging Face directory (a GGUF
file has been converted into one by plexus.model_files first)."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import safetensors
import torch


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
