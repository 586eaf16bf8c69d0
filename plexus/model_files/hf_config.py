"""What a model directory's config.json and generation_config.json say."""
from __future__ import annotations

import json
import pathlib

import torch
import transformers

from plexus.model_files.resolve import missing_config_message


def load_config(model_dir, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The model's transformers config. Whether plexus can run its architecture is the model
    registry's question (plexus.models.registry), asked when the model is built."""
    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(missing_config_message(model_dir))
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read {model_dir / 'config.json'}: {error}") from None
    if getattr(config, "quantization_config", None) is None:
        quant = _separate_quant_config(model_dir, config)
        if quant is not None:
            config.quantization_config = quant
    return config


# Where checkpoints keep their quantization settings when config.json has no quantization_config.
_QUANT_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def _separate_quant_config(model_dir: pathlib.Path, config) -> dict | None:
    """LLMC's vLLM export writes `compression_config` in config.json; older AutoGPTQ / AutoAWQ checkpoints
    have quantize_config.json / quant_config.json beside it."""
    compression = getattr(config, "compression_config", None)
    if isinstance(compression, dict):
        return {"quant_method": "compressed-tensors", **compression}
    for name, method in _QUANT_FILES.items():
        path = model_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError as error:
                raise ValueError(f"cannot parse {path}: {error}") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path} must hold a JSON object")
            return {"quant_method": method, **data}
    return None


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


def load_generation_config(model_dir) -> dict:
    """generation_config.json of `model_dir` as a dict, {} when there is none."""
    path = pathlib.Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"cannot parse {path}: {error}") from None


def quantization_method(hf_config) -> str | None:
    """The quant_method named by the checkpoint's quantization_config, if any."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = qc.get("quant_method")
    return None if method is None else str(method)


# Multimodal checkpoints plexus runs as their text model: architecture -> the text model's architecture.
TEXT_MODELS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# model_type -> the multimodal architecture of a config.json written without "architectures" (a bare Gemma3Config).
MULTIMODAL_MODEL_TYPES = {"gemma3": "Gemma3ForConditionalGeneration"}


def text_model_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The config the engine runs: a multimodal checkpoint's text_config (with the checkpoint's architecture
    mapped to the text model's, its dtype and quantization_config), any other config as it is."""
    architecture = (getattr(config, "architectures", None) or [MULTIMODAL_MODEL_TYPES.get(config.model_type)])[0]
    if architecture not in TEXT_MODELS:
        return config
    text = config.text_config
    text.architectures = [TEXT_MODELS[architecture]]
    for key in ("dtype", "quantization_config"):
        if getattr(text, key, None) is None and getattr(config, key, None) is not None:
            setattr(text, key, getattr(config, key))
    return text
