"""A request's way into the engine, after its prompt was processed (core/input_processor.py): the checks on
add_request's own arguments, and the fan-out of n / best_of into one sequence (a Request) per candidate, each
with its own seed, stop-string matcher and grammar matcher. Everything here raises before the request joins
a batch."""
from __future__ import annotations

from typing import Any

from plexus.core import stopping
from plexus.core.detokenizer import IncrementalDetokenizer
from plexus.core.output_processor import RequestState, SequenceState
from plexus.core.request import Request
from plexus.core.sampling_params import SamplingParams


def check_arguments(request_id: Any, params: Any, priority: Any, unfinished: dict, kwargs: dict) -> SamplingParams:
    """The checks that need no tokenizer; the request's SamplingParams (the defaults when None)."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None)
    if unknown:
        raise TypeError(f"add_request() got keyword arguments plexus does not act on: {', '.join(unknown)}")
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a string, got {type(request_id).__name__}")
    if request_id in unfinished:
        raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
    if params is None:
        params = SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__} "
                        "(pooling requests are not supported)")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an integer, got {priority!r}")
    return params


def check_picklable(request_id: str, params: SamplingParams) -> None:
    """With worker processes ("mp"), a request's logits_processors travel to them by cloudpickle: one that
    cannot be pickled is refused here, naming it, rather than failing inside a step."""
    import cloudpickle

    for fn in params.logits_processors or ():
        try:
            cloudpickle.dumps(fn)
        except Exception as error:  # noqa: BLE001  (pickling raises many types)
            raise ValueError(
                f"request {request_id!r}: logits processor {fn!r} cannot be sent to the worker processes of "
                f"distributed_executor_backend='mp' ({type(error).__name__}: {error}); make it picklable "
                "(a module-level function or a class instance without locks, files or sockets), or run with "
                "distributed_executor_backend='uni'") from None


def fan_out(request_id: str, processed, params: SamplingParams, *, arrival: float, priority: int,
            eos_token_ids: frozenset[int], tokenizer, grammar_matcher, lora_request: Any,
            lora_cache_key: int | None) -> RequestState:
    """The request's state with one sequence per candidate (best_of, else n). processed: the input processor's
    result; grammar_matcher: a function making a fresh grammar matcher, or None."""
    prompt_ids = processed.prompt_token_ids
    state = RequestState(request_id, processed.prompt, prompt_ids, params, lora_request=lora_request)
    candidates = params.best_of or params.n
    for index in range(candidates):
        child_params = params
        if index > 0 and params.prompt_logprobs is not None:
            child_params = params.clone()
            child_params.prompt_logprobs = None      # the prompt is shared; score it once
        stop_strings = None
        if tokenizer is not None and params.detokenize:
            detokenizer = IncrementalDetokenizer(
                tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens)
            stop_strings = stopping.StopStrings(detokenizer, params.stop, params.include_stop_str_in_output,
                                                params.min_tokens)
        request = Request(
            request_id=request_id if candidates == 1 else f"{request_id}#{index}", parent_id=request_id,
            prompt_token_ids=prompt_ids, sampling_params=child_params, max_tokens=processed.max_tokens,
            eos_token_ids=eos_token_ids, seed=None if params.seed is None else params.seed + index,
            arrival_time=arrival, priority=priority, bad_words_token_ids=processed.bad_words_token_ids,
            lora_request=lora_request, lora_cache_key=lora_cache_key,
            grammar=None if grammar_matcher is None else grammar_matcher(), stop_strings=stop_strings)
        state.sequences.append(SequenceState(request, index, [] if params.logprobs is not None else None))
    return state
