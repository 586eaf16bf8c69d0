"""LoRA on the model side: device slots of stacked adapter weights, and the per-token delta.

`max_loras` slots per targeted layer hold each adapter's A and B (B already multiplied by the adapter's
scale), padded with zeros to `max_rank`, plus one more slot of zeros that tokens without an adapter point
at. Each token of a step carries its slot index; a layer's delta is

    delta[t] = (x[t] @ A[slot[t]].T) @ B[slot[t]].T

computed on the layer's unquantized input and added after the base output (LinearLayer.delta), so it works
over every quantization method, and weights are never merged. Two torch reference kernels compute it, with
vLLM punica's semantics: `sgmv` (tokens grouped into segments by slot, one matmul pair per segment: prefill
and mixed steps) and `bgmv` (each token's A and B gathered by its slot index: small decode batches). A fused
layer (q/k/v, gate/up) has one A block per shard stacked along the rank axis, so the shrink is one matmul,
and one B per shard.

The slots are filled from plain data (plexus.core.lora.adapter.LoRAWeights: module name -> A, B, scale),
named by the model's own module names ("layers.0.self_attn.q_proj", "embed_tokens", "lm_head")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# At or below this many tokens with more than one adapter in the step, gather per token (bgmv).
BGMV_MAX_TOKENS = 8


def sgmv(x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], segments: list[tuple[int, torch.Tensor | None]],
         rank: int) -> torch.Tensor:
    """Segmented LoRA: x [T, in]; a [slots, S*rank, in]; bs[s] [slots, out_s, rank]; segments: (slot, the rows
    that use it, or None for all rows). Rows in no segment get zeros. Returns [T, sum(out_s)]."""
    out = x.new_zeros(x.shape[0], sum(b.shape[1] for b in bs))
    for slot, rows in segments:
        xs = x if rows is None else x.index_select(0, rows)
        xa = xs @ a[slot].T                                                   # [n, S*rank]
        ys = torch.cat([xa[:, s * rank:(s + 1) * rank] @ b[slot].T for s, b in enumerate(bs)], dim=1)
        if rows is None:
            return ys
        out.index_copy_(0, rows, ys)
    return out


def bgmv(x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], slots: torch.Tensor, rank: int) -> torch.Tensor:
    """Gathered LoRA: each token's A and B picked by its slot index (slots [T]; the zero slot for none)."""
    xa = torch.bmm(a[slots], x[:, :, None])                                    # [T, S*rank, 1]
    return torch.cat([torch.bmm(b[slots], xa[:, s * rank:(s + 1) * rank])[:, :, 0] for s, b in enumerate(bs)],
                     dim=1)


class LoRAState:
    """The slot of every row of the current forward (tokens, or the rows whose logits are computed)."""

    def __init__(self, none_slot: int) -> None:
        self.none_slot = none_slot
        self.slots: torch.Tensor | None = None
        self.segments: list[tuple[int, torch.Tensor | None]] = []
        self.gather = False

    def set(self, slots: list[int], device: torch.device) -> None:
        """slots: one per row, -1 for none."""
        present = sorted(set(slots) - {-1})
        if len(present) == 1 and -1 not in slots:
            self.segments = [(present[0], None)]
        else:
            t = torch.tensor(slots, device=device)
            self.segments = [(slot, (t == slot).nonzero()[:, 0]) for slot in present]
        self.gather = len(slots) <= BGMV_MAX_TOKENS and len(self.segments) > 1
        self.slots = (torch.tensor([self.none_slot if s < 0 else s for s in slots], device=device)
                      if self.gather else None)


class _Stack:
    """The slots of one layer: A [slots + 1, S * rank, in] and per shard B [slots + 1, out_s, rank]."""

    def __init__(self, num_slots: int, rank: int, in_features: int, out_sizes: list[int], dtype, device) -> None:
        self.rank = rank
        self.a = torch.zeros(num_slots + 1, len(out_sizes) * rank, in_features, dtype=dtype, device=device)
        self.bs = [torch.zeros(num_slots + 1, out, rank, dtype=dtype, device=device) for out in out_sizes]

    def write(self, slot: int, shard: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        r = self.rank
        self.a[slot, shard * r:(shard + 1) * r].zero_()
        self.bs[shard][slot].zero_()
        if a is not None:
            self.a[slot, shard * r:shard * r + a.shape[0]].copy_(a)
            self.bs[shard][slot, :, :b.shape[1]].copy_(b.float() * scale)


class LinearLoRA:
    """The delta of one LinearLayer (LinearLayer.delta)."""

    def __init__(self, state: LoRAState, stack: _Stack) -> None:
        self.state, self.stack = state, stack

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state, stack = self.state, self.stack
        xl = x.reshape(-1, x.shape[-1]).to(stack.a.dtype)
        if state.gather:
            y = bgmv(xl, stack.a, stack.bs, state.slots, stack.rank)
        else:
            y = sgmv(xl, stack.a, stack.bs, state.segments, stack.rank)
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


class EmbeddingLoRA:
    """The delta of the token embedding: A is kept transposed, [slots + 1, vocab, rank], so a token's row is a
    lookup; then the expand as for a linear layer."""

    def __init__(self, state: LoRAState, stack: _Stack) -> None:
        self.state, self.stack = state, stack

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        state, stack = self.state, self.stack
        b = stack.bs[0]
        out = b.new_zeros(input_ids.shape[0], b.shape[1])
        for slot, rows in state.segments:
            ids = input_ids if rows is None else input_ids.index_select(0, rows)
            ys = F.embedding(ids, stack.a[slot]) @ b[slot].T
            if rows is None:
                return ys
            out.index_copy_(0, rows, ys)
        return out


class LoRAModel:
    """Attaches LoRA slots to a model. The model supplies `lora_modules()`: module name -> (LinearLayer, shard)
    or ("embedding", nn.Embedding). Stacks are allocated on first use, per layer, so adapters that target only
    q and v cost nothing on the MLP."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.max_loras, self.max_rank, self.dtype, self.device = model, max_loras, max_rank, dtype, device
        self.state = LoRAState(none_slot=max_loras)
        self.modules = model.lora_modules()
        self.stacks: dict[int, _Stack] = {}                 # id(layer) -> its stack
        self.deltas: dict[int, tuple[object, object]] = {}  # id(layer) -> (layer, its delta)
        self.slot_modules: list[set[str]] = [set() for _ in range(max_loras)]
        self.attached = False

    def targets(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features): what an adapter may target (plain data for the core)."""
        out = {}
        for name, (layer, shard) in self.modules.items():
            if shard == "embedding":
                out[name] = (layer.num_embeddings, layer.embedding_dim)
            else:
                out[name] = (layer.input_size, layer.output_sizes[shard])
        return out

    def _stack(self, layer, shard) -> _Stack:
        key = id(layer)
        if key not in self.stacks:
            if shard == "embedding":
                stack = _Stack(self.max_loras, self.max_rank, layer.embedding_dim, [layer.embedding_dim],
                               self.dtype, self.device)
                stack.a = torch.zeros(self.max_loras + 1, layer.num_embeddings, self.max_rank, dtype=self.dtype,
                                      device=self.device)
                delta = EmbeddingLoRA(self.state, stack)
            else:
                stack = _Stack(self.max_loras, self.max_rank, layer.input_size, layer.output_sizes, self.dtype,
                               self.device)
                delta = LinearLoRA(self.state, stack)
            self.stacks[key] = stack
            self.deltas[key] = (layer, delta)
            if self.attached:
                self._attach_one(layer, delta)
        return self.stacks[key]

    def load(self, slot: int, weights) -> None:
        """Write an adapter (plexus.core.lora.adapter.LoRAWeights) into a slot, or clear it (None)."""
        for name in self.slot_modules[slot]:
            layer, shard = self.modules[name]
            stack = self.stacks[id(layer)]
            if shard == "embedding":
                stack.a[slot].zero_()
                stack.bs[0][slot].zero_()
            else:
                stack.write(slot, shard, None, None, 1.0)
        self.slot_modules[slot] = set()
        if weights is None:
            return
        for name, module in weights.modules.items():
            layer, shard = self.modules[name]
            stack = self._stack(layer, shard)
            if shard == "embedding":
                stack.a[slot, :, :module.rank].copy_(module.a.T)
                stack.bs[0][slot, :, :module.rank].copy_(module.b.float() * module.scale)
            else:
                stack.write(slot, shard, module.a, module.b, module.scale)
            self.slot_modules[slot].add(name)

    def set_tokens(self, slots: list[int]) -> None:
        """The slot of each token of the next forward (-1: no adapter). Deltas are attached to the layers only
        while some token has an adapter, so steps without one run the model's fastest path."""
        active = any(s >= 0 for s in slots)
        if active:
            self.state.set(slots, self.device)
        if active != self.attached:
            self.attached = active
            for layer, delta in self.deltas.values():
                if active:
                    self._attach_one(layer, delta)
                elif hasattr(layer, "num_embeddings"):
                    self.model.embed_delta = None
                else:
                    layer.delta = None
            self.model.ops.forget_model(self.model)

    def set_rows(self, slots: list[int]) -> None:
        """The slot of each row of the next logits computation (a subset of the step's tokens)."""
        self.state.set(slots, self.device)

    def _attach_one(self, layer, delta) -> None:
        if hasattr(layer, "num_embeddings"):
            self.model.embed_delta = delta
        else:
            layer.delta = delta
