"""The engine's per-request state beyond scheduling (text, logprobs) and the RequestOutputs built from it:
vLLM's fields, output kinds (cumulative, delta, final only), and best_of's choice of the n candidates with
the highest cumulative logprob."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plexus.core.detokenizer import detokenize_logprob_token
from plexus.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from plexus.core.request import Request
from plexus.core.sampling_params import RequestOutputKind, SamplingParams
from plexus.core.step import TokenLogprobs


@dataclass
class SequenceState:
    """Engine-side state of one generated sequence: its logprobs and what was already returned (its text is
    in request.stop_strings' detokenizer)."""
    request: Request
    index: int
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    sent_tokens: int = 0            # output tokens already returned (DELTA outputs)
    sent_logprobs: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sent_prompt_logprobs: bool = False
    lora_request: Any = None

    @property
    def finished(self) -> bool:
        return all(seq.request.is_finished for seq in self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def logprob_dict(self, entry: TokenLogprobs, decode: bool) -> dict[int, Logprob]:
        """vLLM's per-position logprobs: the token itself first, then the top-k; decoded_token only when the
        request detokenizes."""
        out = {entry.token_id: Logprob(entry.logprob, entry.rank, self._decode(entry.token_id, decode))}
        for rank, (tok, lp) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1):
            if tok not in out:
                out[tok] = Logprob(lp, rank, self._decode(tok, decode))
        return out

    def _decode(self, token_id: int, decode: bool) -> str | None:
        if not decode or self.tokenizer is None:
            return None
        return detokenize_logprob_token(self.tokenizer, token_id)

    def add_tokens(self, seq: SequenceState, tokens: list[TokenLogprobs]) -> None:
        """The logprobs of the tokens a step appended to the sequence."""
        decode = seq.request.sampling_params.detokenize
        for sampled in tokens:
            seq.cumulative_logprob += sampled.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(self.logprob_dict(sampled, decode))

    def add_prompt_logprobs(self, request: Request, state: RequestState, entries: list[TokenLogprobs]) -> None:
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        decode = request.sampling_params.detokenize
        request.prompt_logprobs.extend(self.logprob_dict(e, decode) for e in entries)
        state.prompt_logprobs = request.prompt_logprobs

    def make_output(self, state: RequestState, now: float) -> RequestOutput | None:
        """The RequestOutput for this step, or None when its output kind has nothing to say yet."""
        params = state.params
        finished = state.finished
        kind = params.output_kind
        best_of = params.best_of or params.n
        if (kind == RequestOutputKind.FINAL_ONLY or best_of > params.n) and not finished:
            return None      # best_of picks its n candidates once all have finished
        sequences = state.sequences
        if best_of > params.n:
            sequences = sorted(sequences, key=lambda q: q.cumulative_logprob, reverse=True)[:params.n]
        delta = kind == RequestOutputKind.DELTA
        completions = [self._completion(seq, i if best_of > params.n else seq.index, state, delta)
                       for i, seq in enumerate(sequences)]
        prompt_logprobs = state.prompt_logprobs
        if delta:
            prompt_logprobs, state.sent_prompt_logprobs = (
                None if state.sent_prompt_logprobs else prompt_logprobs), prompt_logprobs is not None
        first = state.sequences[0].request
        metrics = RequestMetrics(
            arrival_time=first.arrival_time, last_token_time=first.last_token_time,
            first_scheduled_time=first.first_scheduled_time, first_token_time=first.first_token_time,
            time_in_queue=(first.first_scheduled_time - first.arrival_time) if first.first_scheduled_time else None,
            finished_time=now if finished else None)
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs, outputs=completions, finished=finished, metrics=metrics,
            lora_request=state.lora_request, num_cached_tokens=first.num_cached_tokens)

    def _completion(self, seq: SequenceState, index: int, state: RequestState, delta: bool) -> CompletionOutput:
        request = seq.request
        text = ""
        if request.stop_strings is not None:
            detokenizer = request.stop_strings.detokenizer
            text = detokenizer.get_next_output_text(finished=request.is_finished, delta=delta)
        token_ids = list(request.output_token_ids)
        logprobs = seq.logprobs
        if delta:
            token_ids, seq.sent_tokens = token_ids[seq.sent_tokens:], len(token_ids)
            if logprobs is not None:
                logprobs, seq.sent_logprobs = logprobs[seq.sent_logprobs:], len(logprobs)
        return CompletionOutput(
            index=index, text=text, token_ids=token_ids,
            # vLLM reports it only when logprobs were asked for.
            cumulative_logprob=seq.cumulative_logprob if state.params.logprobs is not None else None,
            logprobs=logprobs, finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
            lora_request=state.lora_request)
