"""A CPU implementation of the compiled-model contract that transformers-neuronx
models expose, so the Neuron runner (bucket choice, padding, slots, the
compile-per-bucket lifecycle) runs for real on machines without a device.

It is plexus's own torch Llama with one KV slot per sequence, a cache of
[2, max_num_seqs, max_model_len, kv_heads, head_dim] per layer (the layout
transformers-neuronx's continuous batching keeps on device), and one
torch.compile'd graph with static shapes per bucket: a context-encoding
graph per context bucket (one prompt, right-padded) and a token-generation
graph per token-gen bucket (the whole compiled batch, attending over the
bucket's first n positions). Select it with
override_neuron_config={"backend": "cpu-reference"}."""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plexus.core import buckets
from plexus.platforms.neuron.settings import NeuronSettings

logger = logging.getLogger("plexus")


@dataclass
class SlotMetadata:
    slot_mapping: torch.Tensor      # [T] slot * max_model_len + position of each new token
    context_slot: torch.Tensor | None = None   # [1] the slot a context encoding fills; None: token generation
    mask: torch.Tensor | None = None           # token generation: [B, 1, 1, bucket] which positions each row sees


class SlotAttention:
    """Attention over one KV slot per sequence (the new keys and values are already written)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 has_sinks: bool = False) -> None:
        if sliding_window is not None or logits_soft_cap is not None or has_sinks:
            raise ValueError("the Neuron platform runs plain causal attention only: sliding windows, attention "
                             "soft-capping and sinks are not supported there")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: SlotMetadata) -> torch.Tensor:
        # q: [T, Hq, D] -> [T, Hq * D]; kv_cache: [2, slots, max_model_len, Hkv, D]
        if meta.context_slot is not None:
            n = q.shape[0]     # a context encoding starts at position 0 and attends causally over its tokens
            keys = kv_cache[0].index_select(0, meta.context_slot)[0, :n].transpose(0, 1)     # [Hkv, S, D]
            values = kv_cache[1].index_select(0, meta.context_slot)[0, :n].transpose(0, 1)
            if self.num_heads != self.num_kv_heads:
                group = self.num_heads // self.num_kv_heads
                keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                                 is_causal=True, scale=self.scale)           # [1, Hq, S, D]
            return out[0].transpose(0, 1).reshape(n, -1)
        n = meta.mask.shape[-1]       # row b is slot b
        keys, values = kv_cache[0][:, :n].transpose(1, 2), kv_cache[1][:, :n].transpose(1, 2)  # [B, Hkv, n, D]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=meta.mask, scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)  # [B, Hq, 1, D]
        return out.reshape(q.shape[0], -1)


class ReferenceCompiledModel:
    """forward(input_ids [B, S], cache_ids [B, S], start_ids [B]) -> logits [B, vocab], the contract of
    plexus.platforms.neuron.sdk.TransformersNeuronxModel."""

    def __init__(self, config, settings: NeuronSettings, platform) -> None:
        from plexus.worker.worker import build_model

        self.settings = settings
        self.model = build_model(config, platform, SlotAttention)
        m = config.model
        self.max_len = m.max_model_len
        shape = (2, settings.batch_size, self.max_len, m.num_kv_heads, m.head_dim)
        self.kv_caches = [platform.zeros(shape, m.dtype) for _ in range(m.num_layers)]
        self.logits_dtype = getattr(torch, settings.cast_logits_dtype)
        self.graphs: dict[tuple[str, int], object] = {}      # (kind, bucket) -> compiled graph
        self.compile_seconds: dict[tuple[str, int], float] = {}
        self.last_call: tuple[str, int] | None = None
        # One code object serves every bucket; allow a graph per bucket before dynamo gives up.
        limit = len(settings.context_buckets) + len(settings.token_gen_buckets) + 8
        dynamo = torch._dynamo.config
        name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, name, max(getattr(dynamo, name), limit))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, cache_ids: torch.Tensor, start_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if length > 1:
            if batch != 1 or length not in self.settings.context_buckets:
                raise RuntimeError(f"context encoding takes one prompt padded to a context bucket "
                                   f"{self.settings.context_buckets}, got shape {tuple(input_ids.shape)}")
            last = cache_ids.max(dim=1).values
            key = ("context", length)
            args = (input_ids[0], start_ids[:1].long(), last.long(), self.kv_caches)
        else:
            if batch != self.settings.batch_size:
                raise RuntimeError(f"token generation takes the compiled batch of {self.settings.batch_size} "
                                   f"rows, got {batch}")
            bucket = buckets.pick_bucket(int(cache_ids.max()) + 1, self.settings.token_gen_buckets)
            if bucket is None:
                raise RuntimeError(f"position {int(cache_ids.max())} is past the largest token-gen bucket")
            key = ("token_gen", bucket)
            args = (input_ids[:, 0], cache_ids[:, 0].long(), self.kv_caches)
        graph = self.graphs.get(key)
        if graph is None:
            fn = self._context if key[0] == "context" else functools.partial(self._token_gen, bucket=key[1])
            graph = self.graphs[key] = torch.compile(fn, fullgraph=True, dynamic=False)
            start = time.perf_counter()
            logits = graph(*args)
            self.compile_seconds[key] = time.perf_counter() - start
            logger.info("Compiled the %s graph for bucket %d in %.1f s", key[0], key[1], self.compile_seconds[key])
        else:
            logits = graph(*args)
        self.last_call = key
        return logits.to(self.logits_dtype)

    def _context(self, input_ids, slot, last, kv_caches):
        positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        meta = SlotMetadata(slot_mapping=slot * self.max_len + positions, context_slot=slot)
        hidden = self.model(input_ids, positions, kv_caches, meta, fused=False)
        return self.model.compute_logits(hidden.index_select(0, last))

    def _token_gen(self, input_ids, positions, kv_caches, bucket: int):
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        mask = torch.arange(bucket, device=input_ids.device)[None, :] <= positions[:, None]
        meta = SlotMetadata(slot_mapping=rows * self.max_len + positions, mask=mask[:, None, None, :])
        hidden = self.model(input_ids, positions, kv_caches, meta, fused=False)
        return self.model.compute_logits(hidden)
