"""Every decision that a sequence stops, in one place, once per step.

Before a step: which tokens the sampler must not pick (EOS and stop token ids
while fewer than min_tokens were generated). After it, token by token over
what the step accepted: EOS, stop token ids, the end of a structured-output
grammar, stop strings in the detokenized text, max_tokens and max_model_len.
The engine appends tokens and asks here; nothing else finishes a sequence
(but an abort)."""
from __future__ import annotations

from plexus.core.detokenizer import IncrementalDetokenizer
from plexus.core.request import Request, RequestStatus


def banned_token_ids(request: Request) -> list[int]:
    """Tokens the sampler must not pick for this request's next token (min_tokens)."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return []
    banned = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        banned |= request.eos_token_ids
    return sorted(banned)


class StopStrings:
    """Stop-string matching on one sequence's detokenized text.

    update() appends tokens to the detokenizer, looks for the stop string whose first match ends earliest
    in the new text (the match a one-token-at-a-time stream would hit first, so the cut does not depend on
    how tokens arrive), cuts the text there, and otherwise holds back a tail that may still become a stop
    string, so no text that gets cut is ever shown. Text that the first min_tokens tokens produced is not
    searched (vLLM's min_tokens)."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self.detokenizer = detokenizer
        self.stop = [s for s in (stop or []) if s]   # an empty stop string would match before any text
        self.include = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.stop_str: str | None = None

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that matched (the text is then cut), or None."""
        detok = self.detokenizer
        if self.stop_str is not None:
            detok.update(new_token_ids)
            return self.stop_str
        check_from = len(detok.text)
        for token_id in new_token_ids:
            detok.update([token_id])
            if len(detok.token_ids) <= self.min_tokens:
                check_from = len(detok.text)
        if not self.stop:
            return None
        match = self._earliest_match(detok.text, check_from)
        if match is not None:
            end, start, self.stop_str = match
            detok.cut(end if self.include else start)
            return self.stop_str
        if not self.include:
            detok.held = self._stop_prefix_len(detok.text)
        return None

    def _earliest_match(self, text: str, check_from: int) -> tuple[int, int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self.stop:
            start = text.find(s, max(check_from - len(s) + 1, 0))
            if start != -1 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        return best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def stop_after_token(request: Request, token_id: int, stop_strings: StopStrings | None,
                     max_model_len: int) -> tuple[RequestStatus, int | str | None] | None:
    """Called once the engine appended `token_id` to the request: (the finished status, the stop reason)
    if the request stops here, else None. Feeds the token to the detokenizer through stop_strings."""
    params = request.sampling_params
    status, reason, stop_token = None, None, False
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in request.eos_token_ids:
            status, stop_token = RequestStatus.FINISHED_STOPPED, True
        elif params.stop_token_ids and token_id in params.stop_token_ids:
            status, reason, stop_token = RequestStatus.FINISHED_STOPPED, token_id, True
    if status is None and request.grammar is not None and request.grammar.is_terminated():
        # Structured outputs: the grammar is complete and took its end token (EOS), which ignore_eos or
        # min_tokens did not stop at; nothing may follow it.
        status, stop_token = RequestStatus.FINISHED_STOPPED, True
    # A stop token's text is not shown unless include_stop_str_in_output (vLLM).
    if stop_strings is not None and not (stop_token and not params.include_stop_str_in_output):
        stop_str = stop_strings.update([token_id])
        if stop_str is not None:
            status, reason = RequestStatus.FINISHED_STOPPED, stop_str
    if status is None and (request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len):
        status = RequestStatus.FINISHED_LENGTH
    return None if status is None else (status, reason)
