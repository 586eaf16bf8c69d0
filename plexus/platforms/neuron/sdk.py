"""The transformers-neuronx backend: what plexus asks the Neuron SDK to build.

`model_spec` turns plexus's settings into the exact arguments of
`LlamaForSampling.from_pretrained(...)` / `NeuronConfig(...)` as plain data,
so they are unit-tested on machines without the SDK. `load_sdk_model` is
the only place that imports transformers-neuronx: it builds those objects,
compiles with `to_neuron()` (one graph per bucket) and keeps the compiled
artifacts in a cache directory keyed by everything that changes the graphs,
so a second start loads them instead of compiling again."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from plexus.platforms.neuron.settings import NeuronSettings

logger = logging.getLogger("plexus")

# HF architecture -> transformers-neuronx sampling class: the families the SDK has (vLLM's transformers-neuronx
# loader maps Llama and Mistral; the SDK also has Mixtral and Qwen2). Every other family plexus runs (Qwen3,
# Gemma 2/3, Phi-3, Qwen3-MoE, gpt-oss) is refused on Neuron by name.
ARCHITECTURES = {"LlamaForCausalLM": "LlamaForSampling", "MistralForCausalLM": "MistralForSampling",
                 "MixtralForCausalLM": "MixtralForSampling", "Qwen2ForCausalLM": "Qwen2ForSampling"}
# sampling class -> its module in the transformers_neuronx package
_MODULES = {"LlamaForSampling": "llama.model", "MistralForSampling": "mistral.model",
            "MixtralForSampling": "mixtral.model", "Qwen2ForSampling": "qwen2.model"}
_COMPLETE = "plexus-complete.json"


@dataclass
class NeuronModelSpec:
    model_class: str            # a class of the transformers_neuronx package
    model_path: str             # an HF directory with config.json and safetensors
    from_pretrained: dict       # keyword arguments of model_class.from_pretrained besides neuron_config
    neuron_config: dict         # keyword arguments of NeuronConfig; nested configs as dicts (see load_sdk_model)
    artifacts_dir: Path         # where the compiled graphs are saved and found again

    def cache_key(self) -> dict:
        return {"model_class": self.model_class, "model_path": self.model_path,
                "from_pretrained": self.from_pretrained, "neuron_config": self.neuron_config}


def model_spec(config, settings: NeuronSettings, sdk_version: str = "unknown") -> NeuronModelSpec:
    arch = (getattr(config.model.hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"the {arch} architecture has no transformers-neuronx model in plexus; supported on "
                         f"Neuron: {', '.join(ARCHITECTURES)}")
    neuron_config = {
        "continuous_batching": {"batch_size_for_shared_caches": settings.batch_size},
        "attention_layout": "BSH",
        "collectives_layout": "BSH",
        "fuse_qkv": True,
        "quant": None,
        "weight_tiling": settings.quantize,
    }
    if settings.quantize:
        neuron_config["quant"] = {"quant_dtype": settings.quant_dtype, "dequant_dtype": settings.amp,
                                  "quantize_method": "vector_dynamic"}
    neuron_config.update(settings.overrides)
    spec = NeuronModelSpec(
        model_class=ARCHITECTURES[arch],
        model_path=str(config.model.model_dir),
        from_pretrained={
            "tp_degree": settings.tp_degree,
            "n_positions": list(settings.token_gen_buckets),
            "context_length_estimate": list(settings.context_buckets),
            "batch_size": settings.batch_size,
            "amp": settings.amp,
        },
        neuron_config=neuron_config,
        artifacts_dir=Path())
    spec.artifacts_dir = artifacts_dir(spec, _weights_fingerprint(config.model.model_dir), sdk_version,
                                       config.env.cache_dir)
    return spec


def artifacts_dir(spec: NeuronModelSpec, weights: str, sdk_version: str, cache_dir: Path) -> Path:
    """cache_dir/neuron/<model>-<hash of the model's weights, every graph-shaping argument, SDK version>."""
    key = json.dumps({**spec.cache_key(), "weights": weights, "sdk": sdk_version}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / "neuron" / f"{Path(spec.model_path).name}-{digest}"


def _weights_fingerprint(model_dir: Path) -> str:
    """Names, sizes and mtimes of the checkpoint files: a changed checkpoint must not reuse old graphs."""
    entries = []
    for path in sorted(Path(model_dir).glob("*")):
        if path.suffix in (".safetensors", ".bin", ".json"):
            st = path.stat()
            entries.append(f"{path.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def sdk_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers-neuronx")
    except PackageNotFoundError:
        return "unknown"


def load_sdk_model(spec: NeuronModelSpec):
    """Build, compile (or load the compiled graphs of) and return the transformers-neuronx model."""
    import importlib

    import transformers_neuronx as tnx

    kwargs = dict(spec.neuron_config)
    kwargs["continuous_batching"] = tnx.ContinuousBatchingConfig(**kwargs["continuous_batching"])
    if kwargs.get("quant") is not None:
        kwargs["quant"] = tnx.QuantizationConfig(**kwargs["quant"])
    neuron_config = tnx.NeuronConfig(**kwargs)
    model_class = getattr(importlib.import_module(f"transformers_neuronx.{_MODULES[spec.model_class]}"),
                          spec.model_class)
    model = model_class.from_pretrained(spec.model_path, neuron_config=neuron_config, **spec.from_pretrained)
    return compile_or_load(model, spec)


def compile_or_load(model, spec: NeuronModelSpec):
    """model.to_neuron(), loading the compiled graphs from spec.artifacts_dir when an earlier start saved
    them there (transformers-neuronx: load(dir) before to_neuron() skips compilation), else compiling and
    saving them. The directory appears only once complete, so an interrupted save is never loaded."""
    done = spec.artifacts_dir / _COMPLETE
    start = time.perf_counter()
    if done.exists():
        model.load(str(spec.artifacts_dir))
        model.to_neuron()
        logger.info("Loaded compiled Neuron graphs from %s in %.0f s", spec.artifacts_dir, time.perf_counter() - start)
        return model
    model.to_neuron()
    logger.info("Compiled the Neuron graphs in %.0f s", time.perf_counter() - start)
    tmp = spec.artifacts_dir.with_name(spec.artifacts_dir.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save(str(tmp))
        (tmp / _COMPLETE).write_text(json.dumps(spec.cache_key(), indent=1, default=str))
        shutil.rmtree(spec.artifacts_dir, ignore_errors=True)
        tmp.rename(spec.artifacts_dir)
        logger.info("Saved the compiled Neuron graphs to %s", spec.artifacts_dir)
    except OSError as e:   # a read-only cache must not stop serving
        logger.warning("Could not save the compiled Neuron graphs to %s: %s", spec.artifacts_dir, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return model


class TransformersNeuronxModel:
    """The compiled-model contract over a transformers-neuronx model.

    forward(input_ids [B, S], cache_ids [B, S], start_ids [B]) -> logits [B, vocab]. Context encoding
    (S > 1, B == 1): right-padded to a context bucket; the last real token sits at cache_ids.max() (the
    padding's cache_ids are 0). Token generation (S == 1): B is the compiled batch size, row i is slot i.
    transformers-neuronx pads a prompt to its bucket itself (and then gives the padding positions past the
    prompt, where this runner's padding has 0), so the prompt is handed over unpadded."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, input_ids: torch.Tensor, cache_ids: torch.Tensor, start_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > 1:
            length = int(cache_ids.max()) + 1
            input_ids, cache_ids = input_ids[:, :length], cache_ids[:, :length]
        return self.model(input_ids, cache_ids=cache_ids.to(torch.int32), start_ids=start_ids.to(torch.int32))
