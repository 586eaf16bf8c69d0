"""The Neuron platform's settings, read once in its config step.

Everything that changes the compiled graphs comes from here: the bucket
lists (NEURON_CONTEXT_LENGTH_BUCKETS, NEURON_TOKEN_GEN_BUCKETS), the weight
quantization dtype (NEURON_QUANT_DTYPE), the NeuronConfig overrides
(override_neuron_config), the batch size (max_num_seqs) and the tensor
parallel degree. Every bad value is a ValueError naming the setting and
what is allowed, raised before anything is compiled."""
from __future__ import annotations

import difflib
import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from plexus.core import buckets
from plexus.models.quantization.neuron_quant import NeuronQuantConfig

CONTEXT_BUCKETS_ENV = "NEURON_CONTEXT_LENGTH_BUCKETS"
TOKEN_GEN_BUCKETS_ENV = "NEURON_TOKEN_GEN_BUCKETS"
QUANT_DTYPE_ENV = "NEURON_QUANT_DTYPE"

# plexus's own keys inside override_neuron_config; everything else goes to NeuronConfig.
BACKEND_KEY = "backend"
SDK_BACKEND = "transformers-neuronx"
REFERENCE_BACKEND = "cpu-reference"
BACKENDS = (SDK_BACKEND, REFERENCE_BACKEND)

# transformers-neuronx NeuronConfig.__init__'s keyword arguments (transformers_neuronx/config.py, 2.x).
NEURON_CONFIG_KEYS = (
    "sparse_attn", "quant", "kv_cache_quant", "continuous_batching", "attention_layout", "collectives_layout",
    "cache_layout", "padding_side", "group_query_attention", "sequence_parallel_norm",
    "sequence_parallel_norm_threshold", "bf16_rms_norm", "on_device_embedding", "on_device_generation",
    "all_reduce_dtype", "cast_logits_dtype", "fuse_qkv", "qkv_tiling", "weight_tiling",
    "mlp_in_weight_tiling_permute_order", "mlp_out_weight_tiling_permute_order", "log_softmax_scores",
    "shard_over_sequence", "output_all_logits", "attn_output_transposed", "fused_rmsnorm_qkv",
    "fused_rmsnorm_mlp", "mlp_out_weight_transpose", "fuse_mlp", "is_eagle_target", "is_eagle_draft",
    "has_pre_attention_norm", "compilation_worker_count", "duplicate_q_weight_sos",
)
# Keys plexus sets from its own settings; overriding them would break the runner's contract.
_OWNED_KEYS = {
    "continuous_batching": "it is built from max_num_seqs",
    "quant": "it is built from quantization='neuron_quant' and NEURON_QUANT_DTYPE",
    "output_all_logits": "the runner reads one row of logits per sequence",
    "on_device_generation": "plexus samples on the host with its own sampler",
    "padding_side": "continuous batching pads on the right",
}
CAST_LOGITS_DTYPES = ("float32", "float16", "bfloat16")   # NeuronConfig's valid_dtypes
LAYOUTS = ("BSH", "HSB", "SBH")
_BOOL_KEYS = ("fuse_qkv", "weight_tiling", "qkv_tiling", "bf16_rms_norm", "sequence_parallel_norm",
              "on_device_embedding", "shard_over_sequence", "fuse_mlp", "log_softmax_scores", "fused_rmsnorm_qkv",
              "fused_rmsnorm_mlp", "attn_output_transposed", "mlp_out_weight_transpose")

AMP = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass
class NeuronSettings:
    backend: str
    context_buckets: list[int]          # context_length_estimate: prompt lengths
    token_gen_buckets: list[int]        # n_positions: sequence lengths
    batch_size: int                     # max_num_seqs: the compiled batch of token generation
    tp_degree: int
    amp: str                            # "f32" | "f16" | "bf16"
    quant_dtype: str                    # NEURON_QUANT_DTYPE (used with quantization="neuron_quant")
    quantize: bool
    max_model_len: int
    cast_logits_dtype: str = "float32"
    overrides: dict = field(default_factory=dict)   # NeuronConfig keys from override_neuron_config


def read_settings(config, environ: Mapping[str, str], visible_cores: tuple[int, str] | None) -> NeuronSettings:
    """config: the EngineConfig being built; visible_cores: (count, where it came from), or None when
    unknown (the CPU reference backend on a machine without Neuron devices)."""
    max_model_len = config.model.max_model_len
    overrides = dict(override_neuron_config(config.extra))
    backend = backend_of(overrides)
    overrides.pop(BACKEND_KEY, None)
    _check_overrides(overrides)

    token_gen = _buckets_from_env(environ, TOKEN_GEN_BUCKETS_ENV, max_model_len)
    context = _buckets_from_env(environ, CONTEXT_BUCKETS_ENV, max_model_len)
    if context[-1] > token_gen[-1]:
        raise ValueError(f"{CONTEXT_BUCKETS_ENV}: the largest context bucket ({context[-1]}) is larger than the "
                         f"largest {TOKEN_GEN_BUCKETS_ENV} bucket ({token_gen[-1]}); a prompt's KV cache must fit "
                         "the token-generation graphs")
    layout = overrides.get("cache_layout")
    if layout is not None and str(getattr(layout, "value", layout)) == "BSH" and (len(context) > 1 or len(token_gen) > 1):
        raise ValueError("override_neuron_config['cache_layout']='BSH' supports a single bucket only; set one value "
                         f"in {CONTEXT_BUCKETS_ENV} and {TOKEN_GEN_BUCKETS_ENV} or drop cache_layout")

    # One reading of NEURON_QUANT_DTYPE: the neuron_quant method's (validated even when unused, since a typo
    # there is a typo either way).
    quant = NeuronQuantConfig.from_config(None, environ)

    tp = config.parallel.tensor_parallel_size
    if visible_cores is not None and tp > visible_cores[0]:
        count, source = visible_cores
        raise ValueError(f"tensor_parallel_size={tp} is more than the {count} NeuronCores visible to this process "
                         f"({source}); lower tensor_parallel_size or make more cores visible "
                         "(NEURON_RT_VISIBLE_CORES)")
    dtype = config.model.dtype
    return NeuronSettings(
        backend=backend, context_buckets=context, token_gen_buckets=token_gen,
        batch_size=config.scheduler.max_num_seqs, tp_degree=tp, amp=AMP[dtype], quant_dtype=quant.quant_dtype,
        quantize=config.quantization == "neuron_quant", max_model_len=max_model_len,
        cast_logits_dtype=overrides.get("cast_logits_dtype", "float32"), overrides=overrides)


def override_neuron_config(extra: dict) -> dict:
    """The user's override_neuron_config (EngineConfig.extra holds it as given)."""
    options = extra.get("override_neuron_config")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"override_neuron_config must be a dict of NeuronConfig settings, "
                         f"got {type(options).__name__}")
    return options


def backend_of(overrides: dict) -> str:
    backend = overrides.get(BACKEND_KEY, SDK_BACKEND)
    if backend not in BACKENDS:
        raise ValueError(f"override_neuron_config[{BACKEND_KEY!r}]={backend!r} is not a plexus Neuron backend; "
                         f"allowed: {', '.join(BACKENDS)}")
    return backend


def _buckets_from_env(environ: Mapping[str, str], name: str, max_model_len: int) -> list[int]:
    text = environ.get(name)
    if text is None or not text.strip():
        return [max_model_len]
    return buckets.parse_buckets(text, name, max_value=max_model_len, max_name="max_model_len")


def _check_overrides(overrides: dict) -> None:
    allowed = f"NeuronConfig's keys ({', '.join(NEURON_CONFIG_KEYS)}) and plexus's {BACKEND_KEY!r}"
    for key, value in overrides.items():
        if key not in NEURON_CONFIG_KEYS:
            close = difflib.get_close_matches(key, NEURON_CONFIG_KEYS + (BACKEND_KEY,), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"override_neuron_config: unknown NeuronConfig key {key!r}{hint}; allowed: {allowed}")
        if key in _OWNED_KEYS:
            raise ValueError(f"override_neuron_config[{key!r}] cannot be overridden: {_OWNED_KEYS[key]}")
    cast = overrides.get("cast_logits_dtype", "float32")
    if cast not in CAST_LOGITS_DTYPES:
        raise ValueError(f"override_neuron_config['cast_logits_dtype']={cast!r} is not supported; "
                         f"allowed: {', '.join(CAST_LOGITS_DTYPES)}")
    for key in ("attention_layout", "collectives_layout", "cache_layout"):
        value = overrides.get(key)
        if value is not None and str(getattr(value, "value", value)) not in LAYOUTS:
            raise ValueError(f"override_neuron_config[{key!r}]={value!r} is not a layout; "
                             f"allowed: {', '.join(LAYOUTS)}")
    for key in _BOOL_KEYS:
        if key in overrides and not isinstance(overrides[key], bool):
            raise ValueError(f"override_neuron_config[{key!r}] must be True or False, got {overrides[key]!r}")


def visible_neuron_cores(environ: Mapping[str, str], sysfs: str = "/sys/devices/virtual/neuron_device"
                         ) -> tuple[int, str] | None:
    """How many NeuronCores this process may use, and where that came from: the runtime's
    NEURON_RT_VISIBLE_CORES ("0-3", "0,1" or "2") or NEURON_RT_NUM_CORES, else the driver's per-device
    core_count in sysfs. None when neither says (no Neuron device)."""
    text = environ.get("NEURON_RT_VISIBLE_CORES", "").strip()
    if text:
        cores: set[int] = set()
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            try:
                first, last = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError(f"NEURON_RT_VISIBLE_CORES={text!r}: expected core ids and ranges such as "
                                 "'0-3' or '0,1'") from None
            cores.update(range(first, last + 1))
        return len(cores), f"NEURON_RT_VISIBLE_CORES={text}"
    text = environ.get("NEURON_RT_NUM_CORES", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"NEURON_RT_NUM_CORES={text!r}: expected a positive integer")
        return int(text), f"NEURON_RT_NUM_CORES={text}"
    total = 0
    for path in glob.glob(os.path.join(sysfs, "neuron*", "core_count")):
        try:
            with open(path) as f:
                total += int(f.read().strip())
        except (OSError, ValueError):
            continue
    return (total, f"{sysfs}/neuron*/core_count") if total else None
