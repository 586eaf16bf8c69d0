"""Decode steps replayed from CUDA graphs, one per batch-size bucket (vLLM's cudagraph_capture_sizes).

Every graph reads its inputs from one set of static buffers sized for the largest bucket: token ids,
positions, cache slots, block tables (max_seq_len_to_capture / block_size wide, so the split-K decode
kernel's grid is fixed) and sequence lengths. A step of n <= bucket sequences copies its metadata into the
first n rows and pads the rest to harmless rows: token 0 at position 0, written into a scratch KV block no
request owns, attending to that one slot. Graphs are captured at startup, largest first, into one memory
pool; enforce_eager=True skips them. Steps with prefill chunks, LoRA adapters attached, more sequences than
the largest bucket or longer sequences run eagerly."""
from __future__ import annotations

import logging
import time

import torch

from plexus.core import buckets
from plexus.models.layers.attention import AttentionMetadata, _DecodeGroup

logger = logging.getLogger("plexus")


class DecodeBuffers:
    """The static inputs of the captured graphs, and how a step's metadata fills them (device-agnostic, so it
    is tested on CPU)."""

    def __init__(self, max_batch: int, max_blocks: int, scratch_block: int, block_size: int,
                 device: torch.device) -> None:
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_batch, **long)
        self.positions = torch.zeros(max_batch, **long)
        self.slot_mapping = torch.full((max_batch,), self.scratch_slot, **long)
        self.block_tables = torch.full((max_batch, max_blocks), scratch_block, **long)
        self.seq_lens = torch.ones(max_batch, **long)

    def fill(self, input_ids: torch.Tensor, meta: AttentionMetadata, bucket: int) -> None:
        """Rows :n from the step, rows n:bucket padding."""
        n, d = input_ids.shape[0], meta.decode
        width = d.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(d.block_tables)
        self.block_tables[:n, width:].fill_(self.scratch_block)
        self.seq_lens[:n].copy_(d.seq_lens)
        if n < bucket:
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.slot_mapping[n:bucket].fill_(self.scratch_slot)
            self.block_tables[n:bucket].fill_(self.scratch_block)
            self.seq_lens[n:bucket].fill_(1)

    def metadata(self, bucket: int) -> AttentionMetadata:
        """The decode metadata of the first `bucket` rows (views of the buffers, as the graph captured them)."""
        return AttentionMetadata(
            positions=self.positions[:bucket], slot_mapping=self.slot_mapping[:bucket], num_tokens=bucket,
            decode=_DecodeGroup(tokens=None, block_tables=self.block_tables[:bucket],
                                seq_lens=self.seq_lens[:bucket], mask=None), prefills=[])


class CudaGraphDecode:
    """The runner's `compiled` decode path (the interface of plexus.worker.compiled_decode.CompiledDecode)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], sizes: list[int], max_blocks: int,
                 scratch_block: int, block_size: int, max_seq_len: int | None = None) -> None:
        if max_seq_len is not None:
            max_blocks = min(max_blocks, -(-max_seq_len // block_size))
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        self.max_blocks = max_blocks
        self.buffers = DecodeBuffers(self.sizes[-1], max_blocks, scratch_block, block_size, kv_caches[0].device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.bucket_steps: dict[int, int] = {}

    def bucket_for(self, meta: AttentionMetadata) -> int | None:
        if (meta.prefills or meta.varlen is not None or meta.decode is None
                or meta.decode.block_tables.shape[1] > self.max_blocks):
            return None
        return buckets.pick_bucket(meta.num_tokens, self.sizes)

    def _forward(self, bucket: int) -> torch.Tensor:
        b = self.buffers
        return self.model(b.input_ids[:bucket], b.positions[:bucket], self.kv_caches, b.metadata(bucket),
                          fused=False)

    @torch.inference_mode()
    def capture(self) -> None:
        """Every bucket, largest first, into one memory pool. Each is run once eagerly first (Triton compiles
        its kernels then, and cuBLAS picks its algorithms outside the capture)."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in reversed(self.sizes):
                self._forward(bucket)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[bucket] = self._forward(bucket)
                self.graphs[bucket] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("Captured CUDA graphs for decode batch sizes %s in %.1f s (enforce_eager=True skips them)",
                    self.sizes, time.perf_counter() - start)

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata, bucket: int) -> torch.Tensor:
        """Final hidden states [n, hidden] of a decode step of n <= bucket sequences."""
        self.buffers.fill(input_ids, meta, bucket)
        self.graphs[bucket].replay()
        self.bucket_steps[bucket] = self.bucket_steps.get(bucket, 0) + 1
        return self.outputs[bucket][:input_ids.shape[0]]
