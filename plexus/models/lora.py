"""LoRA on the model side: device slots of stacked adapter weights, and the per-token delta.

`max_loras` slots per targeted layer hold each adapter's A and B (B already multiplied by the adapter's
scale), padded with zeros to `max_rank`. Each token of a step carries its slot index (or none); a layer's
delta is

    delta[t] = (x[t] @ A[slot[t]].T) @ B[slot[t]].T

computed on the layer's unquantized input and added after the base output (LinearLayer.delta), so it works
over every quantization method, and weights are never merged. A fused layer (q/k/v, gate/up) has one A
block per shard stacked along the rank axis, so the shrink is one matmul, and one B per shard. Two torch
kernels compute it, with vLLM punica's semantics:

- `bgmv` (each token with its own slot's A and B): one shrink against every slot's A at once, the other
  slots' columns masked away per token, one expand against every slot's B. Its cost does not depend on how
  many adapters the step mixes, and it runs no gather or per-slot loop: small steps (decode batches).
- `sgmv` (tokens grouped into segments by slot, one matmul pair per segment): long prefill chunks, where
  computing every slot for every token would cost more than the loop.

Layouts: A [slots, S * rank, in] (a slot's block is contiguous; all slots are one [slots * S * rank, in]
matrix), B per shard [out_s, slots, rank] (all slots are one [out_s, slots * rank] matrix).

The slots are filled from plain data (plexus.core.lora.adapter.LoRAWeights: module name -> A, B, scale),
named by the model's own module names ("layers.0.self_attn.q_proj", "embed_tokens", "lm_head")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Steps of more tokens than this run sgmv (a loop over the adapters present) instead of bgmv (every slot for
# every token).
BGMV_MAX_TOKENS = 256


def sgmv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, segments: list[tuple[int, torch.Tensor | None]]
         ) -> torch.Tensor:
    """Segmented LoRA: x [T, in]; a [slots, S*rank, in]; b [out, slots, S*rank]; segments: (slot, the rows that
    use it, or None for all rows). Rows in no segment get zeros. Returns [T, out]."""
    out = None
    for slot, rows in segments:
        xs = x if rows is None else x.index_select(0, rows)
        ys = F.linear(F.linear(xs, a[slot]), b[:, slot])
        if rows is None:
            return ys
        if out is None:
            out = x.new_zeros(x.shape[0], ys.shape[1])
        out.index_copy_(0, rows, ys)
    return out if out is not None else x.new_zeros(x.shape[0], b.shape[0])


def bgmv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, onehot: torch.Tensor, first: int = 0,
         linear=F.linear) -> torch.Tensor:
    """Per-token LoRA over the slots [first, first + onehot.shape[1]): x [T, in]; onehot [T, n], each token's
    slot in that range (a row of zeros: no adapter). `linear`: the platform's matmul for contiguous weights
    (ModelOps.linear)."""
    tokens, n = onehot.shape
    a = a[first:first + n].reshape(-1, a.shape[-1])                          # contiguous: a run of slots
    b = b.view(b.shape[0], -1)[:, first * b.shape[2]:(first + n) * b.shape[2]]
    xa = linear(x, a).view(tokens, n, -1) * onehot[:, :, None]
    xa = xa.view(tokens, -1)
    return linear(xa, b) if b.is_contiguous() else F.linear(xa, b)


class LoRAState:
    """The slot of every row of the current forward (tokens, or the rows whose logits are computed)."""

    def __init__(self, num_slots: int, dtype: torch.dtype) -> None:
        self.num_slots, self.dtype = num_slots, dtype
        # bgmv over the run of slots [first, first + onehot.shape[1]) that the rows use: [T, run]
        self.onehot: torch.Tensor | None = None
        self.first = 0
        self.index: torch.Tensor | None = None         # [T] slot per row, none as `first` (masked by onehot)
        self.segments: list[tuple[int, torch.Tensor | None]] = []

    def set(self, slots: list[int], device: torch.device, counts: list[int] | None = None) -> None:
        """slots: one per row, -1 for none; or, with counts, one per sequence of counts[i] rows."""
        present = sorted(set(slots) - {-1})
        self.first = present[0] if present else 0
        run = present[-1] - self.first + 1 if present else 1
        t = torch.tensor(slots, device=device)
        if counts is not None:
            t = t.repeat_interleave(torch.tensor(counts, device=device))
        self.index = torch.where(t < 0, self.first, t)
        self.onehot = torch.zeros(t.shape[0], run, dtype=self.dtype, device=device)
        self.onehot.scatter_(1, self.index[:, None] - self.first, (t >= 0).to(self.dtype)[:, None])
        self.segments = []
        if t.shape[0] > BGMV_MAX_TOKENS:
            if len(present) == 1 and -1 not in slots:
                self.segments = [(present[0], None)]
            else:
                self.segments = [(slot, (t == slot).nonzero()[:, 0]) for slot in present]


class _Stack:
    """The slots of one layer: A [slots, S * rank, in] and B [out, slots, S * rank], where a fused layer's S shards
    each own `rank` columns of a slot's block and their rows of the output, zero elsewhere (a block-diagonal B:
    one expand matmul for all shards)."""

    def __init__(self, num_slots: int, rank: int, in_features: int, out_sizes: list[int], dtype, device,
                 transposed_a: bool = False) -> None:
        """transposed_a: A as [slots, in, rank] (an embedding's, whose rows are looked up by token id)."""
        self.rank, self.out_sizes = rank, out_sizes
        a_shape = (in_features, rank) if transposed_a else (len(out_sizes) * rank, in_features)
        self.a = torch.zeros(num_slots, *a_shape, dtype=dtype, device=device)
        self.b = torch.zeros(sum(out_sizes), num_slots, len(out_sizes) * rank, dtype=dtype, device=device)

    def write(self, slot: int, shard: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        r, offset, size = self.rank, sum(self.out_sizes[:shard]), self.out_sizes[shard]
        self.a[slot, shard * r:(shard + 1) * r].zero_()
        self.b[offset:offset + size, slot].zero_()
        if a is not None:
            self.a[slot, shard * r:shard * r + a.shape[0]].copy_(a)
            self.b[offset:offset + size, slot, shard * r:shard * r + b.shape[1]].copy_(b.float() * scale)


class LinearLoRA:
    """The delta of one LinearLayer (LinearLayer.delta)."""

    def __init__(self, state: LoRAState, stack: _Stack, linear) -> None:
        self.state, self.stack, self.linear = state, stack, linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state, stack = self.state, self.stack
        xl = x.reshape(-1, x.shape[-1]).to(stack.a.dtype)
        if state.segments:
            y = sgmv(xl, stack.a, stack.b, state.segments)
        else:
            y = bgmv(xl, stack.a, stack.b, state.onehot, state.first, self.linear)
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


class EmbeddingLoRA:
    """The delta of the token embedding: A is kept transposed, [slots, vocab, rank], so a token's row of its
    slot's A is a lookup; then the expand as in bgmv."""

    def __init__(self, state: LoRAState, stack: _Stack) -> None:
        self.state, self.stack = state, stack

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        state, stack = self.state, self.stack
        xa = stack.a[state.index, input_ids][:, None, :] * state.onehot[:, :, None]    # [T, run, rank]
        first, run, rank = state.first, state.onehot.shape[1], stack.a.shape[2]
        b = stack.b.view(stack.b.shape[0], -1)[:, first * rank:(first + run) * rank]
        return F.linear(xa.reshape(xa.shape[0], -1), b)


class LoRAModel:
    """Attaches LoRA slots to a model. The model supplies `lora_modules()`: module name -> (LinearLayer, shard)
    or ("embedding", nn.Embedding). Stacks are allocated on first use, per layer, so adapters that target only
    q and v cost nothing on the MLP."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.max_loras, self.max_rank, self.dtype, self.device = model, max_loras, max_rank, dtype, device
        self.state = LoRAState(max_loras, dtype)
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
                stack = _Stack(self.max_loras, self.max_rank, layer.num_embeddings, [layer.embedding_dim],
                               self.dtype, self.device, transposed_a=True)
                delta = EmbeddingLoRA(self.state, stack)
            else:
                stack = _Stack(self.max_loras, self.max_rank, layer.input_size, layer.output_sizes, self.dtype,
                               self.device)
                delta = LinearLoRA(self.state, stack, layer.ops.linear)
            self.stacks[key] = stack
            self.deltas[key] = (layer, delta)
            if self.attached:
                layer.delta = delta
        return self.stacks[key]

    def load(self, slot: int, weights) -> None:
        """Write an adapter (plexus.core.lora.adapter.LoRAWeights) into a slot, or clear it (None)."""
        for name in self.slot_modules[slot]:
            layer, shard = self.modules[name]
            stack = self.stacks[id(layer)]
            if shard == "embedding":
                stack.a[slot].zero_()
                stack.b[:, slot].zero_()
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
                stack.b[:, slot, :module.rank].copy_(module.b.float() * module.scale)
            else:
                stack.write(slot, shard, module.a, module.b, module.scale)
            self.slot_modules[slot].add(name)

    def set_tokens(self, slots: list[int], counts: list[int]) -> None:
        """The slot of each sequence of the next forward (-1: no adapter) and its number of tokens. Deltas are
        attached to the layers only while some token has an adapter, so steps without one run the model's
        fastest path."""
        active = any(s >= 0 for s in slots)
        if active:
            self.state.set(slots, self.device, counts)
        if active != self.attached:
            self.attached = active
            for layer, delta in self.deltas.values():
                layer.delta = delta if active else None
            self.model.ops.forget_model(self.model)

    def set_rows(self, slots: list[int]) -> None:
        """The slot of each row of the next logits computation (a subset of the step's tokens)."""
        self.state.set(slots, self.device)
