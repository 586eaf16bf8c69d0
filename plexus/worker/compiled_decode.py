"""Decode steps replayed from static-shape graphs, one per batch-size bucket (vLLM's cudagraph_capture_sizes).

One class serves every capture mechanism; what varies is how a graph is made from the model's forward over
the static buffers: torch.compile with static shapes (TorchCompileCapture, the default: on CPU it plays the
part CUDA graphs play on GPUs) or CUDA graphs (plexus.platforms.cuda.graphs.CudaGraphCapture).

Every graph reads its inputs from one set of static buffers sized for the largest bucket: token ids,
positions, cache slots, block tables (max_seq_len_to_capture / block_size wide, so one graph serves every
sequence length) and sequence lengths. A step of n <= bucket sequences copies its metadata into the first n
rows and pads the rest to harmless rows: token 0 at position 0, written into a scratch KV block no request
owns, attending to that one slot. Steps with prefill chunks, more sequences than the largest bucket or longer
sequences run eagerly; so does a model that declares no decode_recipe (plexus.models.layers.recipe): a graph
replays the model's own layer-by-layer forward, which a declared recipe says is made of the shared
static-shape layers.

Graphs are made lazily, the first time a step needs their bucket, or all at once by capture() (CUDA graphs
at startup, largest first, into one memory pool)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from plexus.core import buckets
from plexus.models.layers.attention import AttentionMetadata, _DecodeGroup

logger = logging.getLogger("plexus")

Replay = Callable[[], torch.Tensor]


class DecodeBuffers:
    """The static inputs of the graphs, and how a step's metadata fills them (device-agnostic, so it is tested
    on CPU)."""

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

    def inputs(self, bucket: int) -> tuple[torch.Tensor, ...]:
        """The first `bucket` rows: input ids, positions, slots, block tables, sequence lengths."""
        return (self.input_ids[:bucket], self.positions[:bucket], self.slot_mapping[:bucket],
                self.block_tables[:bucket], self.seq_lens[:bucket])

    def metadata(self, bucket: int) -> AttentionMetadata:
        """The decode metadata of the first `bucket` rows (views of the buffers, as a graph reads them)."""
        return decode_metadata(*self.inputs(bucket)[1:], masked=False, block_size=0)


def decode_metadata(positions, slot_mapping, block_tables, seq_lens, masked: bool, block_size: int
                    ) -> AttentionMetadata:
    """masked: with the mask of each row's keys, for a backend that does not read the block tables itself."""
    mask = None
    if masked:
        width = block_tables.shape[1] * block_size
        mask = (torch.arange(width, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]
    return AttentionMetadata(
        positions=positions, slot_mapping=slot_mapping, num_tokens=positions.shape[0],
        decode=_DecodeGroup(tokens=None, block_tables=block_tables, seq_lens=seq_lens, mask=mask), prefills=[])


class TorchCompileCapture:
    """torch.compile with static shapes: traced at the first replay (seconds on a small CPU; torch's inductor
    cache makes later processes faster)."""

    def __call__(self, forward: Callable[..., torch.Tensor], args: tuple) -> Replay:
        graph = torch.compile(forward, fullgraph=True, dynamic=False)
        return lambda: graph(*args)


class CompiledDecode:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], sizes: list[int],
                 max_blocks: int, scratch_block: int, block_size: int, masked: bool = False,
                 max_seq_len: int | None = None,
                 capture: Callable[[Callable[..., torch.Tensor], tuple], Replay] | None = None) -> None:
        """masked: the attention backend needs a decode mask (it does not read block tables itself);
        max_seq_len: longer sequences run eagerly (vLLM's max_seq_len_to_capture); capture: how a graph is made
        from the forward and its static inputs (TorchCompileCapture by default)."""
        if max_seq_len is not None:
            max_blocks = min(max_blocks, -(-max_seq_len // block_size))
        self.model = model
        self.serves_model = getattr(model, "decode_recipe", None) is not None
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.masked = masked
        self.capture_graph = capture or TorchCompileCapture()
        self.buffers: DecodeBuffers | None = None     # made with the first graph, on the cache's device
        self.graphs: dict[int, Replay] = {}
        self.bucket_steps: dict[int, int] = {}     # bucket -> steps it served (for tests and stats)

    def bucket_for(self, meta: AttentionMetadata) -> int | None:
        """The bucket a step would run in, or None when it is not a pure decode step that fits one."""
        if (not self.serves_model or meta.prefills or meta.varlen is not None or meta.decode is None
                or meta.decode.block_tables.shape[1] > self.max_blocks):
            # (With the kernel's decode-only metadata the block tables are as wide as the longest sequence.)
            return None
        return buckets.pick_bucket(meta.num_tokens, self.sizes)

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata, bucket: int) -> torch.Tensor:
        """Final hidden states [n, hidden] of a decode step of n <= bucket sequences."""
        self._buffers().fill(input_ids, meta, bucket)
        replay = self.graphs.get(bucket)
        if replay is None:
            start = time.perf_counter()
            replay = self._capture(bucket)
            out = replay()     # (torch.compile traces on its first call)
            logger.info("Made the decode graph for batch bucket %d in %.1f s", bucket, time.perf_counter() - start)
        else:
            out = replay()
        self.bucket_steps[bucket] = self.bucket_steps.get(bucket, 0) + 1
        return out[:input_ids.shape[0]]

    @torch.inference_mode()
    def capture(self) -> None:
        """Every bucket's graph now, largest first (the buffers hold padding rows until the first step)."""
        start = time.perf_counter()
        for bucket in reversed(self.sizes):
            if bucket not in self.graphs:
                self._capture(bucket)
        logger.info("Captured decode graphs for batch sizes %s in %.1f s (enforce_eager=True skips them)",
                    self.sizes, time.perf_counter() - start)

    def _buffers(self) -> DecodeBuffers:
        if self.buffers is None:
            self.buffers = DecodeBuffers(self.sizes[-1], self.max_blocks, self.scratch_block, self.block_size,
                                         self.kv_caches[0].device)
        return self.buffers

    def _capture(self, bucket: int) -> Replay:
        replay = self.capture_graph(self._forward, (*self._buffers().inputs(bucket), self.kv_caches))
        self.graphs[bucket] = replay
        return replay

    def _forward(self, input_ids, positions, slot_mapping, block_tables, seq_lens, kv_caches) -> torch.Tensor:
        meta = decode_metadata(positions, slot_mapping, block_tables, seq_lens, self.masked, self.block_size)
        return self.model(input_ids, positions, kv_caches, meta, fused=False)
