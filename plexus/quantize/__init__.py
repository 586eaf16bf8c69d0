"""`plexus quantize`: weight-only integer quantization of a model's decoder linears (RTN, GPTQ or AWQ),
written as a compressed-tensors, GPTQ or AWQ checkpoint that plexus, vLLM and the formats' own libraries
load. The calibration forward passes run HF transformers' model class in fp32 on the resolved model
directory, one decoder layer at a time."""
from __future__ import annotations

import json
import pathlib

from plexus.quantize.config import QuantizeConfig

__all__ = ["QuantizeConfig", "quantize", "quantize_model"]


def quantize(model: str | None, config: QuantizeConfig, out_dir: str | pathlib.Path) -> dict:
    """Quantize `model` (a local HF directory, a .gguf file, a hub id, or None for the bundled model) as
    `config` says and write the checkpoint into out_dir. Returns {"model.layers.i.<linear>": QuantizedWeight}."""
    import torch
    from transformers import AutoModelForCausalLM

    from plexus import model_files
    from plexus.envs import Environment
    from plexus.quantize.formats import write_checkpoint

    env = Environment.read()
    hub = model_files.HubOptions(cache_dir=env.hub_cache_dir, offline=env.hub_offline)
    model_dir = model_files.resolve_model_dir(model, env.cache_dir, hub)
    hf_config = json.loads((model_dir / "config.json").read_text())
    model_dtype = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = config.with_group_size(_linear_shapes(hf))     # the checkpoint records the group size used
    quantized = quantize_model(hf, model_dir, config, model_dtype)

    plain = {name: t for name, t in hf.state_dict().items() if name.removesuffix(".weight") not in quantized}
    if hf.config.tie_word_embeddings:
        plain.pop("lm_head.weight", None)
    write_checkpoint(pathlib.Path(out_dir), model_dir, hf_config, plain, quantized, config,
                     getattr(torch, config.storage_dtype(model_dtype)), getattr(torch, config.scale_dtype(model_dtype)))
    return quantized


def quantize_model(hf, model_dir: pathlib.Path, config: QuantizeConfig, model_dtype: str = "float32") -> dict:
    """Quantize the decoder linears of the transformers model `hf` (fp32) in place, layer by layer: each
    linear's weight becomes its dequantized self (AWQ also rescales the norms and linears before them).
    Returns {"model.layers.i.<linear>": QuantizedWeight}."""
    import torch

    from plexus.quantize.rtn import Quantizer

    shapes = _linear_shapes(hf)
    config = config.with_group_size(shapes)
    config.check_shapes(shapes)
    quantizer = Quantizer(config.bits, config.sym, getattr(torch, config.scale_dtype(model_dtype)),
                          min_zero=1 if config.format == "gptq" and not config.sym else 0)
    hf.eval()
    with torch.no_grad():
        return _quantize_layers(hf, model_dir, config, quantizer)


def _linear_shapes(hf) -> dict[str, tuple[int, int]]:
    """{"model.layers.i.<linear>": (out_features, in_features)} of the decoder linears quantized."""
    from plexus.quantize.calibration import linears_of

    return {f"model.layers.{i}.{name}": (lin.out_features, lin.in_features)
            for i, layer in enumerate(hf.model.layers) for name, lin in linears_of(layer).items()}


def _quantize_layers(hf, model_dir, config, quantizer) -> dict:
    from tqdm import tqdm

    from plexus.quantize import awq, gptq
    from plexus.quantize.calibration import calibration_ids, first_layer_inputs, linears_of, run_layer
    from plexus.quantize.rtn import rtn_quantize

    layers = hf.model.layers
    batches = None
    if config.method != "rtn":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = calibration_ids(tokenizer, config.calibration, config.num_samples, config.seq_len)
        batches = first_layer_inputs(hf, ids)

    quantized = {}
    bar = tqdm(layers, desc=f"{config.method} W{config.bits} g{config.group_size}", unit="layer")
    for i, layer in enumerate(bar):
        if config.method == "gptq":
            # compressed-tensors has no g_idx any more (actorder "weight"): its groups stay in column order.
            result = gptq.quantize_layer(layer, batches, quantizer, config.group_size, config.act_order,
                                         config.damp_percent,
                                         static_groups=config.act_order and config.format == "compressed-tensors")
        elif config.method == "awq":
            result = awq.quantize_layer(layer, batches, quantizer, config.group_size, config.awq_clip)
        else:
            result = {name: rtn_quantize(lin.weight, quantizer, config.group_size)
                      for name, lin in linears_of(layer).items()}
        linears = linears_of(layer)
        for name, qw in result.items():
            linears[name].weight.data = qw.dequantize()
            quantized[f"model.layers.{i}.{name}"] = qw
        if batches is not None and i + 1 < len(layers):
            batches = run_layer(layer, batches)     # the next layer sees this one quantized
    return quantized
