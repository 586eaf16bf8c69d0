"""Structured outputs' request side, in vLLM's names: StructuredOutputsParams (exactly one constraint: a JSON
schema, a regex, a choice, an EBNF grammar, any JSON object, a structural tag) and its older name
GuidedDecodingParams. SamplingParams takes either (plexus.core.sampling_params re-exports both); the engine
compiles them with xgrammar (core/structured_output.py)."""
from __future__ import annotations

import dataclasses
import json as json_module
from dataclasses import dataclass
from typing import Any, ClassVar

# The constraint kinds of structured outputs, in vLLM's order; a request sets exactly one.
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Backends a request or the engine may name: plexus runs structured outputs on xgrammar ("auto" picks it).
STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar")


@dataclass
class StructuredOutputsParams:
    """Structured outputs, as vLLM's: the output must follow exactly one constraint.

    Args:
        json: A JSON schema (a dict or its JSON text); the output is JSON that satisfies it.
        regex: A regular expression the whole output matches.
        choice: A list of strings; the output is one of them.
        grammar: An EBNF grammar (xgrammar's GBNF dialect, starting at the rule ``root``).
        json_object: True: the output is a JSON object, any one.
        disable_fallback: Accepted: xgrammar is the only backend, so there is never a fallback.
        disable_any_whitespace: JSON without whitespace between its elements.
        disable_additional_properties: Accepted: with xgrammar an object never has properties its
            schema does not name, unless the schema allows them.
        whitespace_pattern: An outlines option; refused.
        structural_tag: A structural tag as JSON text: xgrammar's format (with "format"), or vLLM's
            {"structures": [{"begin", "schema", "end"}], "triggers": [...]}.

    The constraint is compiled when the request is added (LLMEngine.add_request): an invalid schema,
    regex or grammar is a ValueError there, naming the field.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    # The SamplingParams field errors name (GuidedDecodingParams: guided_decoding).
    FIELD: ClassVar[str] = "structured_outputs"

    def __post_init__(self) -> None:
        kinds = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError("You can only use one kind of structured outputs constraint but multiple are "
                             f"specified: {', '.join(kinds)} ({self.FIELD})")
        if not kinds:
            raise ValueError("You must use one kind of structured outputs constraint but none are specified "
                             f"({self.FIELD}: set one of {', '.join(STRUCTURED_OUTPUT_KINDS)})")
        name = self.FIELD
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    json_module.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"{name}.json: invalid JSON schema: not valid JSON ({e})") from None
            elif not isinstance(self.json, dict):
                raise ValueError(f"{name}.json must be a JSON schema as a dict or a JSON string, "
                                 f"got {type(self.json).__name__}")
        for key in ("regex", "grammar", "structural_tag"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}.{key} must be a string, got {type(value).__name__}")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError(f"{name}.grammar must not be empty")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, (list, tuple)):
                raise ValueError(f"{name}.choice must be a list of strings, got {self.choice!r}")
            if not self.choice:
                raise ValueError(f"{name}.choice must not be empty")
            if not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"{name}.choice must be a list of strings, got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"{name}.json_object must be True (any JSON object) or None, got {self.json_object!r}")
        for key in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{name}.{key} must be a bool, got {getattr(self, key)!r}")
        if self.whitespace_pattern is not None:
            raise ValueError(f"{name}.whitespace_pattern is not supported: it is an outlines option and plexus runs "
                             "structured outputs on xgrammar; use disable_any_whitespace=True for compact JSON")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of STRUCTURED_OUTPUT_KINDS."""
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None)

    def constraint(self) -> tuple:
        """What the constraint is, whichever class spells it (equality across the two names)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(StructuredOutputsParams))


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name for StructuredOutputsParams (SamplingParams.guided_decoding), with its `backend`:
    None, "auto" or "xgrammar"."""

    backend: str | None = None

    FIELD: ClassVar[str] = "guided_decoding"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend is not None and self.backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise ValueError(f"guided_decoding.backend={self.backend!r} is not supported: plexus runs structured "
                             f"outputs on xgrammar only; allowed: None, {', '.join(STRUCTURED_OUTPUT_BACKENDS)}")


def _structured_outputs(name: str, value: Any, cls: type[StructuredOutputsParams]) -> StructuredOutputsParams | None:
    """The params object for SamplingParams.<name>: an instance as given, or one made from a dict of its fields."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"{name}: unknown fields {unknown}; {cls.__name__} has: {', '.join(sorted(fields))}")
        return cls(**value)
    raise ValueError(f"{name} must be a {cls.__name__} (or a dict of its fields), got {type(value).__name__}")
