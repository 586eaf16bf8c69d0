"""Weight quantization methods, by vLLM's quantization= name.

Each method is a QuantizationConfig (base.py) that picks a LinearMethod per layer; the model asks it while
it is built, so a quantized layer is created with its method's own parameters and never holds a
full-precision copy longer than loading needs. The engine's configuration decides the method's name (the
user's quantization=, or the checkpoint's quantization_config); the worker builds the config with
make_quant_config."""
from __future__ import annotations

from collections.abc import Mapping

from plexus.models.quantization.base import QuantizationConfig
from plexus.models.quantization.neuron_quant import NeuronQuantConfig

# name -> config class
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {"neuron_quant": NeuronQuantConfig}


def make_quant_config(name: str, environ: Mapping[str, str], hf_quant_config: dict | None = None
                      ) -> QuantizationConfig:
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={name!r} is not a known method; known: {', '.join(QUANTIZATION_METHODS)}")
    return QUANTIZATION_METHODS[name].from_config(hf_quant_config, environ)


__all__ = ["QUANTIZATION_METHODS", "QuantizationConfig", "make_quant_config"]
