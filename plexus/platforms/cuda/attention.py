"""Paged attention on the CUDA platform: Triton kernels that read keys and values through the block tables.

A step of one new token per sequence runs the split-K decode kernel (its grid depends only on the block
tables' width, so it is captured into CUDA graphs); any other step, prefill chunks over cached prefixes
mixed with decodes, runs the varlen prefill kernel once over the whole step (AttentionMetadata.varlen)."""
from __future__ import annotations

import torch

from plexus.models.layers.attention import AttentionMetadata, TorchPagedAttention


class TritonPagedAttention(TorchPagedAttention):
    decode_reads_block_tables = True
    prefill_reads_block_tables = True

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, Hq, D] -> [T, Hq * D]. A layer with a sliding window, soft-capping or sinks runs the torch
        path over the same metadata (TorchPagedAttention)."""
        from plexus.platforms.cuda import triton_kernels

        if not self.plain:
            return super().__call__(q, kv_cache, meta, sinks)
        if meta.varlen is not None:
            v = meta.varlen
            out = triton_kernels.paged_prefill_attention(q, kv_cache, v.block_tables, v.query_start_loc, v.seq_lens,
                                                         self.scale, self.num_kv_heads, v.max_query_len)
        elif meta.decode is not None and not meta.prefills and meta.decode.mask is None:
            d = meta.decode
            out = triton_kernels.paged_decode_attention(q, kv_cache, d.block_tables, d.seq_lens, self.scale,
                                                        self.num_kv_heads)
        else:
            raise ValueError("TritonPagedAttention needs the metadata of AttentionMetadata.build(..., "
                             "use_decode_kernel=True, use_varlen_kernel=True)")
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
