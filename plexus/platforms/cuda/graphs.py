"""CUDA graphs as the capture mechanism of plexus.worker.compiled_decode.CompiledDecode: each bucket's decode
step is run once eagerly (Triton compiles its kernels then, and cuBLAS picks its algorithms outside the
capture), then captured into one memory pool shared by every bucket; a replay rewrites the graph's one static
output. The CUDA worker captures every bucket at startup; enforce_eager=True skips them, and steps with LoRA
adapters attached run eagerly."""
from __future__ import annotations

from collections.abc import Callable

import torch

from plexus.worker.compiled_decode import CompiledDecode, Replay


class CudaGraphCapture:
    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def __call__(self, forward: Callable[..., torch.Tensor], args: tuple) -> Replay:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            forward(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = forward(*args)
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.synchronize()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay


class CudaGraphDecode(CompiledDecode):
    """CompiledDecode whose graphs are CUDA graphs, sharing one memory pool."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], sizes: list[int], max_blocks: int,
                 scratch_block: int, block_size: int, max_seq_len: int | None = None) -> None:
        super().__init__(model, kv_caches, sizes, max_blocks, scratch_block, block_size, masked=False,
                         max_seq_len=max_seq_len, capture=CudaGraphCapture())
