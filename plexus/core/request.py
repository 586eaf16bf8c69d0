"""One sequence being generated: its tokens, how many have KV computed, its
blocks, and its status. A request with n > 1 is fanned out into n of these
by the engine; the scheduler only ever sees single sequences."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from plexus.core.sampling_params import SamplingParams
from plexus.core.step import SamplingSettings


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()      # something raised while running it; the others went on

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}


@dataclass(eq=False)   # identity: a request is hashable and equal only to itself
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int                       # resolved: never runs past max_model_len
    eos_token_ids: frozenset[int]
    seed: int | None = None               # this sequence's sampling seed (the request's + its index)
    priority: int = 0                     # lower runs first under scheduling_policy="priority"
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    parent_id: str = ""                  # the user's request id (children of n > 1 share it)
    lora_request: object = None          # its LoRARequest, or None
    lora_cache_key: int | None = None    # keys its prefix-cache blocks apart from other adapters' (LoRAManager)
    grammar: object = None               # structured outputs: its GrammarMatcher (core/structured_output.py)
    stop_strings: object = None          # its stopping.StopStrings (holds the detokenizer); None without one
    arrival_time: float = field(default_factory=time.time)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None

    # token_ids = prompt + output; num_computed_tokens of them have KV in the cache.
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # of the full blocks of token_ids
    # Proposed next tokens for the model to verify in its next step (speculative decoding fills it; the
    # scheduler schedules them after the real tokens and update_from_output clears it).
    draft_token_ids: list[int] = field(default_factory=list)

    # Prompt logprobs accumulate across prefill chunks.
    prompt_logprobs: list | None = None

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.sampling = SamplingSettings.from_params(self.sampling_params)   # what crosses the step boundary

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def lora_id(self) -> int:
        """Its adapter's lora_int_id, 0 for none."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
