"""The step boundary: what the core hands the model side for one step, and what comes back.

Plain, picklable data only (ids, lists, SamplingParams, integer seeds), never a live Request or a
torch.Generator, so the model side may live in another process (tensor-parallel ranks, a remote worker).
Randomness is reproducible without shared state: a seeded sequence's noise for a step comes from
(seed, seed_offset), where the offset counts the tokens it has sampled so far."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from plexus.core.sampling_params import SamplingParams


@dataclass
class SequenceStep:
    """One sequence's share of a step: compute KV for `token_ids` at positions [start, start + len), and
    sample the next token from the last one if `sample`."""
    request_id: str
    token_ids: list[int]
    start: int
    block_ids: list[int]
    sample: bool
    params: SamplingParams
    num_prompt_tokens: int
    seed: int | None = None              # None: the worker's shared generator
    seed_offset: int = 0                 # tokens this sequence has sampled before this step
    banned_token_ids: list[int] = field(default_factory=list)   # e.g. EOS and stop ids before min_tokens
    bad_words_token_ids: list[list[int]] = field(default_factory=list)   # each bad word's tokens
    # The prompt and output so far, only when a penalty reads them (copying them every step would cost
    # O(length) per token); the prompt also while prompt logprobs are being computed.
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None
    # Prompt logprobs: the first prompt position whose logprob is still to be reported (0 has none).
    prompt_logprobs_from: int = 1
    lora_slot: int = -1                  # the device slot of its LoRA adapter; -1: none
    # Structured outputs: the tokens its grammar allows next, bit t % 32 of word t // 32 set for token t
    # (xgrammar's layout); int32 [ceil(vocab_size / 32)]. None: no constraint this step (or it allows all).
    token_bitmask: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StepInput:
    sequences: list[SequenceStep]
    # LoRA slots to fill before the step runs: slot -> the adapter's weights (core/lora/adapter.LoRAWeights,
    # plain tensors), or None to empty it.
    lora_loads: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)


@dataclass
class TokenLogprobs:
    """A token with its logprob and rank, and the top-k alternatives, for one position."""
    token_id: int
    logprob: float
    rank: int | None      # None when the request asked for no logprobs
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class StepOutput:
    # request_id -> the tokens it accepted this step, in order (one today; several for speculative decoding)
    sampled: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # request_id -> logprobs of the prompt positions this step scored, in order
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


def step_seed(seed: int, offset: int) -> int:
    """The seed of a seeded sequence's noise for one step: independent streams for every (seed, offset),
    and the same on every worker."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), offset]).generate_state(1, np.uint64)[0] >> 1)
