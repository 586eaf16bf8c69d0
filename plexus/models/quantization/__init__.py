"""Weight quantization methods, by vLLM's quantization= name.

A method's config is read once, in EngineArgs.create_engine_config (make_quant_config); after the weights
are loaded, quantize_model swaps the layers the method quantizes for ones that store quantized weights."""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from plexus.models.quantization.neuron_quant import NeuronQuantConfig

# name -> config class: from_environ(environ) reads its settings, quantize_layer(prefix, layer) swaps a layer.
QUANTIZATION_METHODS = {"neuron_quant": NeuronQuantConfig}


def make_quant_config(name: str, environ: Mapping[str, str]):
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={name!r} is not a known method; known: {', '.join(QUANTIZATION_METHODS)}")
    return QUANTIZATION_METHODS[name].from_environ(environ)


def quantize_model(model: nn.Module, quant_config) -> nn.Module:
    """Swap the layers quant_config quantizes, in place. The model then carries quant_config, so that
    paths reading raw weights (the fused C++ decode step) stand aside."""
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            replacement = quant_config.quantize_layer(f"{prefix}.{name}" if prefix else name, child)
            if replacement is not None:
                setattr(module, name, replacement)
    model.quant_config = quant_config
    return model
