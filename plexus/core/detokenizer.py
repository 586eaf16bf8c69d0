"""Incremental detokenization (stop strings are matched on its text by plexus.core.stopping).

One `IncrementalDetokenizer` per sequence turns the tokens generated so far
into text as they arrive, without re-decoding the whole sequence each step.
It uses the prefix/read-offset method of vLLM and TGI: decode a short window
of ids that starts a few tokens before the new ones, decode the same window
without the new ones, and the difference is the new text. The tokens before
the new ones give the decoder the context it needs to render a leading space
(SentencePiece decoders drop one at the start of a decode) and to join bytes
of a UTF-8 character that a byte-level tokenizer split across tokens.
"""

from __future__ import annotations

import functools

# Prompt tokens decoded ahead of the first generated token, as vLLM does
# (INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET), so that token renders as it
# would in a decode of prompt + generation.
_PROMPT_CONTEXT_TOKENS = 5

# A UTF-8 character is at most 4 bytes, so a tail still unfinished after this
# many tokens is not one character waiting for its last bytes: it is invalid
# bytes (or skipped special tokens), and holding it longer would only make
# every later decode of the window slower.
_MAX_HELD_TOKENS = 16

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text and stop-string state of one generated sequence.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_token_ids: the prompt; only its last few tokens are kept, as
            decoding context for the first generated token.
        skip_special_tokens: leave special tokens out of the text.
        spaces_between_special_tokens: passed on to `tokenizer.decode`; like
            vLLM, only tokenizers whose decode honours it (slow ones) use it.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens

        self._token_ids: list[int] = []
        # The ids from the prefix offset on; `_read` is the read offset within
        # it. Everything before `_read` has been turned into text already.
        self._window: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._window)
        self._prefix_text: str | None = None  # decode of _window[:_read], cached

        self.text = ""  # all complete text so far (a stop string cut, see cut())
        self.held = 0  # chars at the end of text not shown yet (they may start a stop string)
        self._sent = 0  # chars of output_text already returned as deltas
        self._cut = False  # the text was cut at a stop string: nothing more is added
        self._finished = False

    @property
    def token_ids(self) -> list[int]:
        """The generated tokens (not the prompt)."""
        return self._token_ids

    @property
    def output_text(self) -> str:
        """The text that is safe to show: no half character, and no held tail."""
        return self.text[: len(self.text) - self.held]

    def update(self, new_token_ids: list[int]) -> None:
        """Append newly generated tokens and the text they complete."""
        self._token_ids.extend(new_token_ids)
        if self._cut or self._finished:
            return
        for token_id in new_token_ids:
            self.text += self._decode_next(token_id)

    def cut(self, end: int) -> None:
        """End the text at `end` (a stop string matched); later tokens add no text."""
        self.text = self.text[:end]
        self.held = 0
        self._cut = True

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to put in a RequestOutput: all of `output_text` or, with
        `delta`, only what no earlier delta call returned. `finished` flushes
        what was held back, an unfinished character included (decoded with
        replacement characters, since no token will complete it)."""
        if finished:
            self._finish()
        text = self.output_text
        if not delta:
            return text
        new_text = text[self._sent :]
        self._sent = len(text)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of tokenization spaces: it rewrites text across token
        # boundaries, which an incremental decode cannot follow (vLLM skips it too).
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_next(self, token_id: int) -> str:
        """Add one token to the window; return the text it completes."""
        self._window.append(token_id)
        return self._take_new_text(final=False)

    def _take_new_text(self, final: bool) -> str:
        window, read = self._window, self._read
        if read == len(window):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(window[:read])
        prefix_text = self._prefix_text
        new_text = self._decode(window)
        hold = len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)
        if hold and not final and len(window) - read < _MAX_HELD_TOKENS:
            return ""
        # The emitted tokens become the next window's context.
        self._window = window[read:]
        self._read = len(self._window)
        self._prefix_text = None
        return new_text[len(prefix_text) :]

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if not self._cut:
            self.text += self._take_new_text(final=True)
        self.held = 0


@functools.lru_cache(maxsize=1 << 16)
def detokenize_logprob_token(tokenizer, token_id: int) -> str:
    """The `decoded_token` of a Logprob entry: one token rendered on its own,
    as vLLM does (a piece of a UTF-8 character shows as U+FFFD)."""
    token = tokenizer.convert_ids_to_tokens([token_id])[0]
    if token is None:  # an id past the vocabulary (padded embedding rows)
        return ""
    return tokenizer.convert_tokens_to_string([token])
