"""Where a model's files are, and reading its config and weights.

A model is always served from a local Hugging Face directory (config.json,
safetensors weights, tokenizer files). A GGUF file, including the bundled
SmolLM2-135M-Instruct, is first converted into such a directory by
`plexus.models.gguf`. Nothing is ever downloaded from a model hub.
"""

import json
import pathlib
from collections.abc import Iterator

import safetensors
import torch
import transformers

from plexus.models.gguf import bundled_gguf_path, convert_gguf
from plexus.models.llama import ARCHITECTURES

BUNDLED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SUPPORTED_ARCHITECTURES = set(ARCHITECTURES)

_BUNDLED_ALIASES = {BUNDLED_MODEL_NAME, BUNDLED_MODEL_NAME.split("/")[-1]}

# A config.json written from a bare LlamaConfig has no "architectures"; its model_type says enough.
_MODEL_TYPE_TO_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def resolve_model_dir(model: str | None) -> pathlib.Path:
    """The local Hugging Face directory to serve `model` from.

    `model` is None or the bundled model's name (the bundled GGUF, converted),
    a .gguf file (converted), or a model directory. An existing path wins over
    the bundled name.
    """
    if model is None:
        return convert_gguf(bundled_gguf_path())
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return _resolve_dir(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path)
        raise ValueError(
            f"model {model!r} is a file but not a .gguf file; pass a model directory "
            "(config.json + safetensors) or a .gguf file"
        )
    if str(model) in _BUNDLED_ALIASES:
        return convert_gguf(bundled_gguf_path())
    raise ValueError(
        f"model {model!r}: no such file or directory. plexus never downloads from a model "
        "hub; pass a local model directory (config.json + safetensors), a .gguf file, or "
        f"{BUNDLED_MODEL_NAME!r} for the bundled model"
    )


def _resolve_dir(path: pathlib.Path) -> pathlib.Path:
    if (path / "config.json").is_file():
        return path
    gguf_files = sorted(path.glob("*.gguf"))
    if len(gguf_files) == 1:
        return convert_gguf(gguf_files[0])
    if len(gguf_files) > 1:
        names = ", ".join(f.name for f in gguf_files)
        raise ValueError(
            f"model directory {path} has no config.json and several .gguf files ({names}); "
            "pass the .gguf file to use"
        )
    raise ValueError(_missing_config_message(path))


def _missing_config_message(path: pathlib.Path) -> str:
    return f"model directory {path} has no config.json (config.json is missing)"


def load_config(model_dir) -> transformers.PretrainedConfig:
    """The model's transformers config, refused unless plexus can run its architecture."""
    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(_missing_config_message(model_dir))
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read {model_dir / 'config.json'}: {error}") from None
    architectures = config.architectures or []
    if not architectures and config.model_type in _MODEL_TYPE_TO_ARCHITECTURE:
        architectures = [_MODEL_TYPE_TO_ARCHITECTURE[config.model_type]]
    supported = [arch for arch in architectures if arch in SUPPORTED_ARCHITECTURES]
    if not supported:
        named = ", ".join(architectures) or f"none (model_type {config.model_type!r})"
        raise ValueError(
            f"model in {model_dir} has architecture {named}, which plexus does not support; "
            f"supported architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    config.architectures = supported
    return config


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint was saved in (config `dtype`/`torch_dtype`), float32 if unstated."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config dtype {dtype!r} is not a floating-point torch dtype")
    return dtype


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


def load_generation_config(model_dir) -> dict:
    """generation_config.json of `model_dir` as a dict, {} when there is none."""
    path = pathlib.Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"cannot parse {path}: {error}") from None
