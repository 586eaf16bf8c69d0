"""The step boundary: what the core hands the model side for one step, and what comes back.

Plain, picklable data only (ids, lists, the sampling settings as plain fields, integer seeds), never a live
Request, SamplingParams or torch.Generator, so the model side may live in another process (the "mp"
executor's workers, tensor-parallel ranks, Ray actors). A request's logits_processors are the one kind of
callable that crosses: by cloudpickle, checked when the request is added (core/executor).
Randomness is reproducible without shared state: a seeded sequence's noise for a step comes from
(seed, seed_offset), where the offset counts the tokens it has sampled so far."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from plexus.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingSettings:
    """What the model side reads of a request's SamplingParams, under vLLM's names (the sampler's settings
    and how many logprobs to return). Made once per request."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logits_processors: list[Callable] | None = None

    @classmethod
    def from_params(cls, params: SamplingParams) -> SamplingSettings:
        return cls(**{name: getattr(params, name) for name in cls.__dataclass_fields__})


@dataclass
class SequenceStep:
    """One sequence's share of a step: compute KV for `token_ids` at positions [start, start + len), and
    sample the next token from the last one if `sample`."""
    request_id: str
    token_ids: list[int]
    start: int
    block_ids: list[int]
    sample: bool
    params: SamplingSettings
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
    # The last len(draft_token_ids) of token_ids are proposed tokens to verify (speculative decoding): the
    # model returns the ones it accepts and one more token of its own.
    draft_token_ids: list[int] = field(default_factory=list)

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
    # request_id -> the tokens it accepted this step, in order: one, or the accepted drafts and one more
    sampled: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # request_id -> logprobs of the prompt positions this step scored, in order
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


def step_seed(seed: int, offset: int) -> int:
    """The seed of a seeded sequence's noise for one step: independent streams for every (seed, offset),
    and the same on every worker."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), offset]).generate_state(1, np.uint64)[0] >> 1)
