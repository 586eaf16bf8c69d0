"""Everything a request is checked for before it joins a batch: the prompt (text or token ids), every
sampling setting against this model (vocabulary, max_logprobs, max_model_len, the platform's limits), and
the tokens its bad words and stop strings need. Errors name the setting and what is allowed, in vLLM's
wording where users' code may match on it."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from plexus.core.config import EngineConfig
from plexus.core.sampling_params import SamplingParams


@dataclass
class ProcessedRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    max_tokens: int                          # resolved: never runs past max_model_len
    bad_words_token_ids: list[list[int]]


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config.model.vocab_size

    def process(self, prompt: Any, params: SamplingParams) -> ProcessedRequest:
        text, ids = self.tokenize(prompt)
        self._check_params(params, ids)
        room = self._max_sequence_len(ids, params) - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return ProcessedRequest(text, ids, max_tokens, self._bad_words_token_ids(params))

    def tokenize(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, ids = prompt["prompt"], None
        else:
            raise TypeError("prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}, "
                            f"got {type(prompt).__name__}")
        if ids is None:
            if not isinstance(text, str):
                raise TypeError(f"prompt text must be a string, got {type(text).__name__}")
            if not text:
                raise ValueError("Prompt cannot be empty: give at least one token")
            _check_unicode(text)
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer, but skip_tokenizer_init=True; "
                                 "pass {'prompt_token_ids': [...]} instead")
            ids = self.tokenizer.encode(text)
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}")
        ids = list(ids)
        if not ids:
            raise ValueError("Prompt cannot be empty: give at least one token")
        bad = next((t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids must be integers in [0, {self.vocab_size}); got {bad!r} "
                             f"({type(bad).__name__})")
        ids = [int(t) for t in ids]          # numpy integers included
        out_of_vocab = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if out_of_vocab is not None:
            raise ValueError(f"Token id {out_of_vocab} is out of vocabulary: prompt_token_ids must be in "
                             f"[0, {self.vocab_size})")
        return text, ids

    def _check_params(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        max_model_len = self.config.model.max_model_len
        if len(prompt_ids) > max_model_len - 1:
            raise ValueError(
                f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum model length: the "
                f"model's context length is only {max_model_len} tokens (max_model_len={max_model_len}), which "
                "leaves no room "
                "to generate; shorten the prompt or raise max_model_len")
        platform = self.config.platform
        if params.prompt_logprobs is not None and not platform.supports_prompt_logprobs:
            raise ValueError(f"prompt_logprobs is not supported on the {platform.name} platform: its "
                             "compiled graphs return logits for the last position only")
        max_logprobs = self.config.model.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is None or max_logprobs == -1:
                continue
            wanted = self.vocab_size if value == -1 else value
            if wanted > max_logprobs:
                raise ValueError(f"Requested {name}={value} ({wanted} per token), which is greater than max "
                                 f"allowed: max_logprobs={max_logprobs}; raise max_logprobs (-1 for no limit)")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", list(params.logit_bias or ()))):
            bad = next((t for t in ids or () if t >= self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name} contains token id {bad}, which is out of vocabulary: token ids must be "
                                 f"in [0, {self.vocab_size})")
        if self.tokenizer is None:
            for name in ("stop", "bad_words"):
                if getattr(params, name):
                    raise ValueError(f"{name} needs a tokenizer, but skip_tokenizer_init=True")
        for word in params.stop:
            _check_unicode(word, "stop")

    def _max_sequence_len(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """How long this request's sequence may grow. max_tokens past max_model_len is clipped (as vLLM
        does); past a platform's largest compiled bucket it is refused now rather than failing mid-way."""
        limit = self.config.model.max_model_len
        sched = self.config.scheduler
        if sched.max_prompt_len is not None and len(prompt_ids) > sched.max_prompt_len[0]:
            bound, setting = sched.max_prompt_len
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than the largest bucket of {setting} "
                             f"({bound}); shorten the prompt or add a larger bucket")
        if sched.max_seq_len is not None and sched.max_seq_len[0] < limit:
            bound, setting = sched.max_seq_len
            wanted = len(prompt_ids) + (1 if params.max_tokens is None else params.max_tokens)
            if wanted > bound:
                raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                                 f"({params.max_tokens or 1}) needs {wanted} positions, more than the largest "
                                 f"bucket of {setting} ({bound}); lower max_tokens or add a larger bucket")
            limit = bound
        return limit

    def _bad_words_token_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word's tokens, at the start of the text and after a space (as vLLM tokenizes them)."""
        words: list[list[int]] = []
        for word in params.bad_words:
            for prefix in ("", " "):
                ids = self.tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                # The spaced form counts only when the space makes a different first token of the same length.
                if prefix and (not ids or ids[0] == words[-1][0] or len(ids) != len(words[-1])):
                    continue
                if ids:
                    words.append(ids)
        bad = [t for ids in words for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"bad_words tokenize to ids {bad} outside the model's vocabulary of {self.vocab_size}")
        return words


def _check_unicode(text: str, name: str = "prompt") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {text[e.start:e.end]!r} at position {e.start} is a "
                         "lone surrogate, which no tokenizer can encode") from None
