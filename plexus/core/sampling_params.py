"""SamplingParams: how one request turns logits into tokens, in vLLM's names.

A vLLM user passes the same keywords and gets the same defaults and the same
validation errors. Features plexus does not implement yet are refused here,
at construction, rather than silently ignored.
"""

import copy
import enum
import logging
import math
import numbers
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from plexus.core.structured_output_params import (  # noqa: F401  (vLLM's import path for them is this module)
    STRUCTURED_OUTPUT_BACKENDS, STRUCTURED_OUTPUT_KINDS, GuidedDecodingParams, StructuredOutputsParams,
    _structured_outputs)

logger = logging.getLogger(__name__)

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# Positive temperatures below this are raised to it: dividing logits by a
# smaller number overflows to inf/nan (vLLM's _MAX_TEMP).
MIN_POSITIVE_TEMPERATURE = 1e-2


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.Enum):
    """What LLMEngine.step returns for a request (vLLM's names): everything so far, only what is new since
    the last output, or one output when it finishes."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class BeamSearchParams:
    """Beam search parameters for LLM.beam_search, as vLLM's."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    # vLLM's field, kept for its scripts: beam search stops only at EOS, whose token stays in each sequence's
    # tokens and text either way, so there is no stop string to include or leave out.
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not (isinstance(self.temperature, numbers.Real) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature!r}.")
        if not (isinstance(self.length_penalty, numbers.Real) and math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}.")


@dataclass(repr=False, eq=True)
class SamplingParams:
    """Sampling parameters for text generation, as in vLLM.

    Args:
        n: Number of output sequences to return for the prompt.
        best_of: Number of candidate sequences sampled for the prompt; the n with
            the highest cumulative logprob are returned (vLLM 0.6's meaning).
            None means n.
        presence_penalty: Penalizes tokens that already appear in the output,
            in [-2, 2].
        frequency_penalty: Penalizes tokens by how often they appear in the
            output, in [-2, 2].
        repetition_penalty: Penalizes tokens that appear in the prompt or the
            output; > 1 discourages repetition, < 1 encourages it.
        temperature: Randomness of sampling; 0 means greedy.
        top_p: Cumulative probability of the top tokens to consider, in (0, 1].
        top_k: Number of top tokens to consider; -1 considers all.
        min_p: Minimum probability of a token relative to the most likely
            token, in [0, 1]; 0 disables it.
        seed: Random seed for this request's sampling.
        stop: String(s) that stop generation; not included in the output
            unless include_stop_str_in_output.
        stop_token_ids: Token ids that stop generation.
        bad_words: Words that are never generated: their last token is banned
            wherever the tokens before it were just generated.
        include_stop_str_in_output: Keep the stop string in the output text.
        ignore_eos: Keep generating after the EOS token.
        max_tokens: Maximum number of tokens to generate per sequence; None
            generates until the model's context length.
        min_tokens: Minimum number of tokens before EOS or stop_token_ids
            may be generated.
        logprobs: Number of top log probabilities to return per output token,
            besides the sampled token's; -1 returns the whole vocabulary.
        prompt_logprobs: Number of log probabilities per prompt token.
        detokenize: Whether to detokenize the output.
        skip_special_tokens: Skip special tokens in the output text.
        spaces_between_special_tokens: Put spaces between special tokens in
            the output text.
        logits_processors: Callables fn(output_token_ids, logits) -> logits or
            fn(prompt_token_ids, output_token_ids, logits) -> logits, applied in
            order to the request's row of raw logits before sampling.
        truncate_prompt_tokens: Not supported; plexus never truncates prompts.
        output_kind: RequestOutputKind of LLMEngine.step outputs.
        logit_bias: Token id -> bias added to its logit before sampling.
        allowed_token_ids: Only these tokens may be sampled.
        structured_outputs: A StructuredOutputsParams (or a dict of its fields): the output follows a
            JSON schema, a regex, a choice of strings, an EBNF grammar or a structural tag.
        guided_decoding: vLLM's older name for structured_outputs (a GuidedDecodingParams).
        use_beam_search, length_penalty, early_stopping: vLLM 0.6's beam search settings, accepted at their
            defaults and refused otherwise, as vLLM 0.6.2 did: beam search is LLM.beam_search.
    """

    n: int = 1
    _: KW_ONLY
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list[Any] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    guided_decoding: GuidedDecodingParams | None = None
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    # Derived in __post_init__: characters of output text the detokenizer
    # must hold back because they might be the start of a stop string.
    output_text_buffer_length: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        self._normalize()
        self._refuse_unsupported()
        self._verify_args()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncation knobs cannot change an argmax.
            self.top_p = 1.0
            self.top_k = -1
            self.min_p = 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1

    def _normalize(self) -> None:
        for name in (
            "presence_penalty", "frequency_penalty", "repetition_penalty",
            "temperature", "top_p", "min_p",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}.")
            setattr(self, name, float(value))
        for name in ("n", "top_k", "min_tokens"):
            setattr(self, name, _as_int(name, getattr(self, name)))
        for name in ("best_of", "max_tokens", "seed"):
            if getattr(self, name) is not None:
                setattr(self, name, _as_int(name, getattr(self, name)))
        # vLLM: logprobs=True means "the sampled token's logprob plus top 1".
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is True:
                setattr(self, name, 1)
            elif value is not None:
                setattr(self, name, _as_int(name, value))
        if self.seed == -1:  # vLLM's spelling of "no seed"
            self.seed = None
        if 0.0 < self.temperature < MIN_POSITIVE_TEMPERATURE:
            logger.warning(
                "temperature %s is less than %s, which may cause numerical "
                "errors (nan or inf); raising it to %s.",
                self.temperature, MIN_POSITIVE_TEMPERATURE, MIN_POSITIVE_TEMPERATURE,
            )
            self.temperature = MIN_POSITIVE_TEMPERATURE

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = [] if self.bad_words is None else list(self.bad_words)
        if self.logits_processors is not None:
            self.logits_processors = list(self.logits_processors)
        if self.output_kind is None:
            self.output_kind = RequestOutputKind.CUMULATIVE
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}.")
            # JSON keys arrive as strings (the OpenAI API); vLLM takes them.
            self.logit_bias = {_as_int("logit_bias token id", int(k) if isinstance(k, str) and k.lstrip("-").isdigit()
                                       else k): v for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        # guided_decoding is vLLM's older name: it becomes structured_outputs, which is all the engine reads.
        self.guided_decoding = _structured_outputs("guided_decoding", self.guided_decoding, GuidedDecodingParams)
        self.structured_outputs = _structured_outputs("structured_outputs", self.structured_outputs,
                                                      StructuredOutputsParams)
        if self.guided_decoding is not None:
            if self.structured_outputs is None:
                self.structured_outputs = self.guided_decoding
            elif self.structured_outputs.constraint() != self.guided_decoding.constraint():
                raise ValueError("guided_decoding and structured_outputs are both set and differ; set only "
                                 "structured_outputs (guided_decoding is vLLM's older name for it)")

    def _refuse_unsupported(self) -> None:
        if self.use_beam_search:
            width = self.best_of or self.n
            raise ValueError(
                "use_beam_search=True: beam search is not a sampling parameter (vLLM dropped it from SamplingParams "
                f"in 0.6.3); run it with LLM.beam_search(prompts, BeamSearchParams(beam_width={width}, "
                f"max_tokens={self.max_tokens}, length_penalty={self.length_penalty}))."
            )
        if self.length_penalty != 1.0 or self.early_stopping is not False:
            raise ValueError(
                "length_penalty and early_stopping apply to beam search only (vLLM 0.6's names); leave them at "
                "1.0 and False, and pass length_penalty to LLM.beam_search's BeamSearchParams instead."
            )
        if self.truncate_prompt_tokens is not None:
            raise ValueError(
                "truncate_prompt_tokens is not supported: plexus never truncates "
                "prompts; shorten the prompt instead."
            )
        # extra_args only reaches custom plugins in vLLM; plexus has none, so it carries it untouched.

    def _verify_args(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(
                    f"best_of must be greater than or equal to n={self.n}, got {self.best_of}."
                )
            if self.best_of > 1 and self.temperature < SAMPLING_EPS:
                raise ValueError(
                    f"best_of must be 1 when using greedy sampling, got {self.best_of}."
                )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(
                f"repetition_penalty must be a finite number greater than zero, "
                f"got {self.repetition_penalty}."
            )
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}."
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                raise ValueError(
                    f"{name} must be non-negative or -1 (whole vocabulary), got {value}."
                )
        if not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool)
            for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must contain only integers, got {self.stop_token_ids}."
            )
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids}."
            )
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be a signed 64-bit integer, in [-2**63, 2**63 - 1], got {self.seed}.")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind (CUMULATIVE, DELTA, FINAL_ONLY), "
                             f"got {self.output_kind!r}.")
        if not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}.")
        if self.logits_processors is not None and not all(callable(f) for f in self.logits_processors):
            raise ValueError("logits_processors must be a list of callables "
                             "fn(output_token_ids, logits) or fn(prompt_token_ids, output_token_ids, logits).")
        if self.logit_bias is not None and not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                for v in self.logit_bias.values()):
            raise ValueError(f"logit_bias values must be finite numbers, got {self.logit_bias!r}.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty.")
            self.allowed_token_ids = [_as_int("allowed_token_ids", t) for t in self.allowed_token_ids]
            if any(t < 0 for t in self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids must be non-negative token ids, got {self.allowed_token_ids}.")
        if self.logit_bias is not None and any(t < 0 for t in self.logit_bias):
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {sorted(self.logit_bias)}.")
        if self.stop and not self.detokenize:
            raise ValueError(
                "stop strings are only supported when detokenize is True. "
                "Set detokenize=True to use stop."
            )

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        """stop_token_ids as a set; the engine adds the EOS token itself."""
        return set(self.stop_token_ids)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return (
            f"SamplingParams(n={self.n}, "
            f"presence_penalty={self.presence_penalty}, "
            f"frequency_penalty={self.frequency_penalty}, "
            f"repetition_penalty={self.repetition_penalty}, "
            f"temperature={self.temperature}, "
            f"top_p={self.top_p}, "
            f"top_k={self.top_k}, "
            f"min_p={self.min_p}, "
            f"seed={self.seed}, "
            f"stop={self.stop}, "
            f"stop_token_ids={self.stop_token_ids}, "
            f"bad_words={self.bad_words}, "
            f"include_stop_str_in_output={self.include_stop_str_in_output}, "
            f"ignore_eos={self.ignore_eos}, "
            f"max_tokens={self.max_tokens}, "
            f"min_tokens={self.min_tokens}, "
            f"logprobs={self.logprobs}, "
            f"prompt_logprobs={self.prompt_logprobs}, "
            f"skip_special_tokens={self.skip_special_tokens}, "
            f"spaces_between_special_tokens={self.spaces_between_special_tokens}, "
            f"truncate_prompt_tokens={self.truncate_prompt_tokens}, "
            f"logit_bias={self.logit_bias}, "
            f"allowed_token_ids={self.allowed_token_ids}, "
            f"extra_args={self.extra_args}, "
            f"structured_outputs={self.structured_outputs})"
        )


def _as_int(name: str, value: Any) -> int:
    # numbers.Integral so numpy integers pass; bool is an int but never meant.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(value)


# What a model's generation_config.json may set for a request that leaves it out (vLLM's --generation-config auto).
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(generation_config: dict | None, base: SamplingParams | None = None) -> dict[str, Any]:
    """The sampling fields generation_config.json sets; with `base`, every such field, the rest from it."""
    gen = generation_config or {}
    fallback = {} if base is None else {k: getattr(base, k) for k in GENERATION_DEFAULTS}
    return {**fallback, **{k: gen[k] for k in GENERATION_DEFAULTS if gen.get(k) is not None}}
