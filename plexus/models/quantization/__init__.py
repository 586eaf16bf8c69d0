"""Weight quantization methods, by vLLM's quantization= name.

Each method is a QuantizationConfig (base.py) that picks a LinearMethod per layer; the model asks it while
it is built, so a quantized layer is created with its method's own parameters and never holds a
full-precision copy longer than loading needs. The engine's configuration decides the method's name (the
user's quantization=, or the checkpoint's quantization_config); the worker builds the config with
make_quant_config. Methods are imported on first use (bitsandbytes, for one, pulls in its library)."""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from plexus.models.quantization.base import QuantizationConfig

# name -> "module:class" of its QuantizationConfig
QUANTIZATION_METHODS: dict[str, str] = {
    "neuron_quant": "plexus.models.quantization.neuron_quant:NeuronQuantConfig",
    "int8": "plexus.models.quantization.int8:Int8Config",
    "w8a8": "plexus.models.quantization.int8:W8A8Config",
    "fp8": "plexus.models.quantization.fp8:Fp8Config",
    "awq": "plexus.models.quantization.awq:AWQConfig",
    "gptq": "plexus.models.quantization.gptq:GPTQConfig",
    "compressed-tensors": "plexus.models.quantization.compressed_tensors:CompressedTensorsConfig",
    "bitsandbytes": "plexus.models.quantization.bitsandbytes:BitsAndBytesConfig",
    "gguf": "plexus.models.quantization.gguf:GGUFConfig",
    "mxfp4": "plexus.models.quantization.mxfp4:Mxfp4Config",
}


def quant_config_class(name: str) -> type[QuantizationConfig]:
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={name!r} is not a known method; known: {', '.join(QUANTIZATION_METHODS)}")
    module, _, cls = QUANTIZATION_METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_quant_config(name: str, environ: Mapping[str, str], hf_quant_config: dict | None = None
                      ) -> QuantizationConfig:
    return quant_config_class(name).from_config(hf_quant_config, environ)


__all__ = ["QUANTIZATION_METHODS", "QuantizationConfig", "make_quant_config", "quant_config_class"]
