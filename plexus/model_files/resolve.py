"""Where a model's files are.

A model is always served from a local Hugging Face directory (config.json,
safetensors weights, tokenizer files). A GGUF file, including the bundled
SmolLM2-135M-Instruct, is first converted into such a directory by
`plexus.model_files.gguf`."""
from __future__ import annotations

import pathlib

from plexus.model_files.gguf import bundled_gguf_path, convert_gguf

BUNDLED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BUNDLED_ALIASES = {BUNDLED_MODEL_NAME, BUNDLED_MODEL_NAME.split("/")[-1]}


def resolve_model_dir(model: str | None, cache_root: pathlib.Path | None = None) -> pathlib.Path:
    """The local Hugging Face directory to serve `model` from.

    `model` is None or the bundled model's name (the bundled GGUF, converted),
    a .gguf file (converted), or a model directory. An existing path wins over
    the bundled name. cache_root: where conversions go (default $PLEXUS_CACHE_DIR)."""
    if model is None:
        return convert_gguf(bundled_gguf_path(), cache_root)
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return _resolve_dir(path, cache_root)
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path, cache_root)
        raise ValueError(
            f"model {model!r} is a file but not a .gguf file; pass a model directory "
            "(config.json + safetensors) or a .gguf file"
        )
    if str(model) in _BUNDLED_ALIASES:
        return convert_gguf(bundled_gguf_path(), cache_root)
    raise ValueError(
        f"model {model!r}: no such file or directory. plexus never downloads from a model "
        "hub; pass a local model directory (config.json + safetensors), a .gguf file, or "
        f"{BUNDLED_MODEL_NAME!r} for the bundled model"
    )


def _resolve_dir(path: pathlib.Path, cache_root: pathlib.Path | None) -> pathlib.Path:
    if (path / "config.json").is_file():
        return path
    gguf_files = sorted(path.glob("*.gguf"))
    if len(gguf_files) == 1:
        return convert_gguf(gguf_files[0], cache_root)
    if len(gguf_files) > 1:
        names = ", ".join(f.name for f in gguf_files)
        raise ValueError(
            f"model directory {path} has no config.json and several .gguf files ({names}); "
            "pass the .gguf file to use"
        )
    raise ValueError(missing_config_message(path))


def missing_config_message(path: pathlib.Path) -> str:
    return f"model directory {path} has no config.json (config.json is missing)"
