"""The CUDA worker: plexus's torch worker, with a KV cache sized by a profiling pass and decode steps from
CUDA graphs.

The KV budget is vLLM's (V1): gpu_memory_utilization is this engine's share of the GPU's memory, so two
engines of 0.4 fit on one GPU. The KV cache gets that share less what the engine holds once the weights are
loaded (torch's reserved memory) and less the peak activations of one forward pass at max_num_batched_tokens
(the longest step the scheduler can make), sampler included. At startup the GPU must have that share free.
num_gpu_blocks_override skips the profile."""
from __future__ import annotations

import logging

import numpy as np
import torch

from plexus.models.layers.attention import AttentionMetadata
from plexus.worker.worker import Worker, kv_bytes_per_block

logger = logging.getLogger("plexus")


def profile_batch(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """The sequence lengths of the profiling step: max_num_batched_tokens prompt tokens spread over as many
    sequences as the scheduler may run (none longer than max_model_len), as vLLM's profile run does."""
    tokens = max_num_batched_tokens
    seqs = max(min(max_num_seqs, tokens), -(-tokens // max_model_len))
    tokens = min(tokens, seqs * max_model_len)
    return [tokens // seqs + (1 if i < tokens % seqs else 0) for i in range(seqs)]


GIB = 1 << 30


def check_free_at_startup(free: int, total: int, utilization: float) -> None:
    """The engine's share of the GPU must be free when it starts (other processes may hold the rest)."""
    if free < total * utilization:
        raise ValueError(
            f"gpu_memory_utilization={utilization} asks for {total * utilization / GIB:.2f} GiB of this GPU's "
            f"{total / GIB:.2f} GiB, but only {free / GIB:.2f} GiB are free (other processes hold the rest); "
            "lower gpu_memory_utilization or free memory on the GPU")


def kv_budget_from_profile(total: int, utilization: float, in_use: int, peak_activations: int) -> int:
    """Bytes the KV cache may take: the engine's share of the device's total, less what the engine holds
    (weights) and the peak activations of the profiling step. Raises naming the setting when nothing is left."""
    budget = int(total * utilization) - in_use - peak_activations
    if budget <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: gpu_memory_utilization={utilization} allows "
            f"{total * utilization / GIB:.2f} GiB of {total / GIB:.2f} GiB; the weights take {in_use / GIB:.2f} GiB "
            f"and the peak activations {peak_activations / GIB:.2f} GiB; raise gpu_memory_utilization, or lower "
            "max_num_batched_tokens or max_num_seqs")
    return budget


class CudaWorker(Worker):
    def __init__(self, config, platform, rank: int = 0) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_device(rank)
            if config.cache.num_gpu_blocks_override is None:
                check_free_at_startup(*torch.cuda.mem_get_info(), config.cache.gpu_memory_utilization)
        super().__init__(config, platform, rank)

    def initialize_cache(self, num_blocks: int) -> None:
        super().initialize_cache(num_blocks)
        config = self.config
        graphs = not config.enforce_eager and (self.lora is None) and self.device.type == "cuda"
        self.runner.compiled = None
        if graphs:
            from plexus.platforms.cuda.graphs import CudaGraphDecode

            self.runner.compiled = CudaGraphDecode(
                self.model, self.kv_caches, config.compilation.cudagraph_capture_sizes,
                max_blocks=-(-config.model.max_model_len // config.cache.block_size), scratch_block=self.num_blocks,
                block_size=config.cache.block_size, max_seq_len=config.compilation.max_seq_len_to_capture)
            self.runner.compiled.capture()

    def _kv_budget_bytes(self) -> int:
        peak = self._profile_activations()
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info()
        in_use = torch.cuda.memory_reserved()
        budget = kv_budget_from_profile(total, self.config.cache.gpu_memory_utilization, in_use, peak)
        per_block = kv_bytes_per_block(self.config)
        logger.info("KV cache budget: %.2f GiB (%d blocks) = gpu_memory_utilization %.2f x %.2f GiB - %.2f GiB of "
                    "weights - %.2f GiB peak activations at max_num_batched_tokens=%d", budget / GIB,
                    budget // per_block, self.config.cache.gpu_memory_utilization, total / GIB, in_use / GIB,
                    peak / GIB, self.config.scheduler.max_num_batched_tokens)
        return budget

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak bytes allocated by one forward pass and the logits of its last tokens at the longest step,
        beyond the weights and the pass's own scratch KV cache."""
        cfg = self.config
        lens = profile_batch(cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_num_seqs,
                             cfg.model.max_model_len)
        bs, m = cfg.cache.block_size, cfg.model
        block_ids, used = [], 0
        for n in lens:
            blocks = -(-n // bs)
            block_ids.append(list(range(used, used + blocks)))
            used += blocks
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        caches = [torch.zeros((2, used, bs, m.num_kv_heads, m.head_dim), dtype=m.dtype, device=self.device)
                  for _ in range(m.num_layers)]
        cache_bytes = torch.cuda.memory_allocated() - base
        meta = AttentionMetadata.build(lens, lens, block_ids, bs, self.device, use_decode_kernel=True,
                                       use_varlen_kernel=True)
        input_ids = torch.zeros(sum(lens), dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, meta.positions, caches, meta)
        last = torch.from_numpy(np.cumsum(lens) - 1).to(self.device)
        logits = self.model.compute_logits(hidden[last])
        torch.log_softmax(logits, dim=-1, dtype=torch.float32)   # the sampler's largest temporary
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base - cache_bytes
        del caches, hidden, logits
        return max(peak, 0)
