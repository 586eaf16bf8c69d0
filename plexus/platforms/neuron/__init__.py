"""The AWS Neuron platform (Inf2/Trn1): transformers-neuronx graphs compiled per
bucket, continuous batching over one KV slot per sequence, s8/f8 weight
quantization and tensor parallelism across NeuronCores.

Nothing here imports the Neuron SDK; `sdk.load_sdk_model` does, when a
worker is built. Settings: plexus/platforms/neuron/settings.py; the guide:
docs/neuron.md."""
from __future__ import annotations

import glob
import importlib.util
import logging

import torch

from plexus.platforms import host
from plexus.platforms.interface import Platform
from plexus.platforms.registry import hookimpl

logger = logging.getLogger("plexus")

# What transformers-neuronx needs: itself, the torch-neuronx runtime bindings and the neuronx-cc compiler.
SDK_MODULES = {"transformers_neuronx": "transformers-neuronx", "torch_neuronx": "torch-neuronx",
               "neuronxcc": "neuronx-cc"}
INSTALL_HINT = ("on an Inf2/Trn1 instance with the Neuron driver (aws-neuronx-dkms), install the SDK with "
                "`pip install --extra-index-url=https://pip.repos.neuron.amazonaws.com transformers-neuronx "
                "torch-neuronx neuronx-cc` (see docs/neuron.md). To run plexus's Neuron code path on CPU for "
                "testing, pass override_neuron_config={'backend': 'cpu-reference'}")


def missing_requirements() -> list[str]:
    """What keeps the Neuron platform from running here (cheap: no import, no device call)."""
    missing = [f"the {package} package" for module, package in SDK_MODULES.items()
               if importlib.util.find_spec(module) is None]
    if not glob.glob("/dev/neuron[0-9]*"):
        missing.append("a Neuron device (/dev/neuron0)")
    return missing


class NeuronPlatform(Platform):
    name = "neuron"
    device_type = "cpu"          # the host side: the SDK takes and returns CPU tensors, the sampler runs there
    # The SDK quantizes the weights itself (NEURON_QUANT_DTYPE); quantized checkpoint formats are refused.
    supported_quantizations = ("neuron_quant",)
    supports_paged_kv = False
    supports_prompt_logprobs = False
    auto_priority = 100

    def is_available(self) -> bool:
        return not missing_requirements()

    def is_available_for(self, options: dict) -> bool:
        from plexus.platforms.neuron.settings import REFERENCE_BACKEND, backend_of, override_neuron_config

        if backend_of(override_neuron_config(options)) == REFERENCE_BACKEND:
            return True
        return self.is_available()

    def unavailable_reason(self) -> str:
        return f"the Neuron platform needs {' and '.join(missing_requirements())}; {INSTALL_HINT}"

    def max_tensor_parallel_size(self) -> int:
        # The real bound, the NeuronCores visible to this process, is checked in check_and_update_config with
        # a message that says where the count came from.
        return 1 << 16

    def check_and_update_config(self, config) -> None:
        from plexus.platforms.neuron import sdk
        from plexus.platforms.neuron.settings import (
            CONTEXT_BUCKETS_ENV, REFERENCE_BACKEND, SDK_BACKEND, TOKEN_GEN_BUCKETS_ENV, backend_of,
            override_neuron_config, read_settings, visible_neuron_cores)

        if backend_of(override_neuron_config(config.extra)) == REFERENCE_BACKEND:
            host.apply_cpu_dtype_rules(config.model)   # it computes on this CPU: the CPU's dtype rules
        variables = config.env.variables()
        settings = read_settings(config, variables, visible_neuron_cores(variables))
        max_model_len = config.model.max_model_len
        cache, sched = config.cache, config.scheduler
        if cache.block_size_explicit and cache.block_size != max_model_len:
            raise ValueError(f"block_size={cache.block_size} conflicts with max_model_len={max_model_len}: on Neuron "
                             "each sequence owns one KV slot of max_model_len tokens, so block_size must equal "
                             "max_model_len; leave block_size unset or set it to max_model_len")
        cache.block_size = max_model_len
        cache.enable_prefix_caching = False          # a slot belongs to one sequence; graphs cannot share it
        sched.enable_chunked_prefill = False         # a prompt is encoded in one context graph
        # Every running sequence decodes in every step (token generation pads the idle slots), so the token
        # budget must hold the whole batch plus the longest prompt.
        sched.max_num_batched_tokens = max(sched.max_num_batched_tokens, max_model_len + settings.batch_size)
        sched.max_prompt_len = (settings.context_buckets[-1], CONTEXT_BUCKETS_ENV)
        sched.max_seq_len = (settings.token_gen_buckets[-1], TOKEN_GEN_BUCKETS_ENV)
        config.compilation.level = 0                 # the backend compiles its own graphs per bucket
        if settings.backend == SDK_BACKEND:
            sdk.model_spec(config, settings)         # refuse an architecture transformers-neuronx lacks, now
        else:
            from plexus.worker.worker import kv_bytes_per_block

            # block_size is max_model_len now: one block is one slot.
            need, budget = kv_bytes_per_block(config) * settings.batch_size, self.kv_cache_budget_bytes(config)
            if need > budget:
                raise ValueError(
                    f"the {REFERENCE_BACKEND} backend keeps a KV slot of max_model_len={max_model_len} tokens for "
                    f"each of max_num_seqs={settings.batch_size} sequences: {need / (1 << 30):.2f} GiB, more than "
                    f"kv_cache_space ({budget / (1 << 30):.2f} GiB); lower max_num_seqs or max_model_len, or "
                    "raise kv_cache_space")
        if settings.token_gen_buckets[-1] < max_model_len:
            logger.warning("sequences are limited to %d tokens, the largest bucket of %s (max_model_len=%d)",
                           settings.token_gen_buckets[-1], TOKEN_GEN_BUCKETS_ENV, max_model_len)
        config.extra["neuron_settings"] = settings

    def kv_cache_budget_bytes(self, config) -> int:
        space = config.cache.kv_cache_space
        return int((host.DEFAULT_KV_CACHE_SPACE_GIB if space is None else space) * (1 << 30))

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return host.lazy_zeros(shape, dtype)     # lazily zeroed host memory

    worker_cls = "plexus.platforms.neuron.worker.NeuronWorker"


@hookimpl
def plexus_platform() -> Platform:
    return NeuronPlatform()
