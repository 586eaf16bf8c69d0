"""Structured outputs (vLLM's StructuredOutputsParams) on xgrammar.

A request's constraint is compiled once, when the request is added, into a grammar over the model's
vocabulary: a bad schema, regex or grammar is a ValueError there, before the request joins a batch. Each of
its sequences (n > 1 and best_of fan out into several) then walks the grammar with a matcher of its own:
before a step that samples its next token, the matcher gives the tokens the grammar allows (a bitmask that
the sampler applies, plain data on the step); after the step, the matcher takes the token. Once the grammar
is complete it allows only the end-of-sequence tokens, and taking one terminates it (plexus.core.stopping
then finishes the sequence with finish_reason "stop")."""
from __future__ import annotations

import json
import math
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from plexus.core.config import StructuredOutputsConfig
from plexus.core.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

# Compiled grammars are cached by xgrammar (by what was compiled); this bounds the cache of a long-running server.
CACHE_LIMIT_BYTES = 512 * 1024 * 1024


class StructuredOutputManager:
    """Made once per engine. The xgrammar tokenizer info and compiler are built at the first constrained
    request (about 0.2 s for a 49k vocabulary), so engines that never see one do not pay for them."""

    def __init__(self, config: StructuredOutputsConfig, tokenizer: Any, vocab_size: int,
                 eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size                 # the width of the model's logits
        self.eos_token_ids = sorted(eos_token_ids)   # the tokens that end a complete grammar
        self.bitmask_width = math.ceil(vocab_size / 32)
        self._compiler: xgrammar.GrammarCompiler | None = None

    @property
    def compiler(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            try:
                import xgrammar
            except ImportError:
                raise ValueError("structured outputs need the xgrammar package: pip install xgrammar") from None
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.eos_token_ids or None)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                      cache_limit_bytes=CACHE_LIMIT_BYTES)
        return self._compiler

    def compile(self, params: SamplingParams) -> xgrammar.CompiledGrammar | None:
        """The request's compiled constraint, None when it has none. Raises ValueError naming the field."""
        so: StructuredOutputsParams | None = params.structured_outputs
        if so is None:
            return None
        kind = so.kind
        name = f"{so.FIELD}.{kind}"
        if self.tokenizer is None:
            raise ValueError(f"{so.FIELD} needs the tokenizer, but the engine was created with "
                             "skip_tokenizer_init=True")
        compiler = self.compiler
        any_whitespace = not (so.disable_any_whitespace or self.config.disable_any_whitespace)
        try:
            if kind == "json":
                return compiler.compile_json_schema(so.json, any_whitespace=any_whitespace)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
            if kind == "regex":
                return compiler.compile_regex(so.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(so.choice))
            if kind == "grammar":
                return compiler.compile_grammar(so.grammar)
            return self._compile_structural_tag(so.structural_tag)
        except KeyError as error:
            raise ValueError(f"{name}: invalid structural tag: missing key {error}") from None
        except (RuntimeError, ValueError, TypeError) as error:
            what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regular expression",
                    "choice": "choice", "grammar": "EBNF grammar", "structural_tag": "structural tag"}[kind]
            raise ValueError(f"{name}: invalid {what}: {_xgrammar_message(error)}") from None

    def _compile_structural_tag(self, text: str) -> xgrammar.CompiledGrammar:
        import xgrammar

        tag = json.loads(text)
        if isinstance(tag, dict) and "structures" in tag:
            # vLLM's older form: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}
            items = [xgrammar.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                     for s in tag["structures"]]
            return self.compiler.compile_structural_tag(items, tag["triggers"])
        return self.compiler.compile_structural_tag(text)

    def matcher(self, grammar: xgrammar.CompiledGrammar) -> xgrammar.GrammarMatcher:
        """A fresh matcher for one sequence."""
        import xgrammar

        return xgrammar.GrammarMatcher(grammar)

    def next_token_bitmask(self, matcher: xgrammar.GrammarMatcher, banned_token_ids: list[int]
                           ) -> tuple[np.ndarray | None, list[int]]:
        """The bitmask of the tokens the grammar allows next (None if it allows every token), and the banned
        tokens to keep banning. EOS is banned before min_tokens, but once the grammar is complete and only EOS
        may follow, that ban would leave nothing to sample: then the grammar's end wins over min_tokens."""
        bitmask = np.empty(self.bitmask_width, dtype=np.int32)
        if not matcher.fill_next_token_bitmask(bitmask):
            return None, banned_token_ids
        if banned_token_ids:
            allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")     # [32 * W]: token t's bit
            allowed[[t for t in banned_token_ids if t < allowed.size]] = 0
            if not allowed.any():
                banned_token_ids = []
        return bitmask, banned_token_ids


def accept_token(matcher: xgrammar.GrammarMatcher, token_id: int) -> None:
    """Advance a sequence's matcher by the token it sampled. The sampler only picks tokens the grammar allows,
    so a refusal is a bug; it fails that request alone (the engine's per-request error handling)."""
    if not matcher.accept_token(token_id):
        raise RuntimeError(f"structured outputs: the grammar does not accept the sampled token {token_id}")


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose strings are exactly the choices. JSON string escapes are also EBNF's."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _xgrammar_message(error: Exception) -> str:
    """xgrammar's message without the C++ source location it carries ("[12:00:00] /project/cpp/x.cc:12: ")."""
    text = str(error).strip()
    text = re.sub(r"^\[[\d:]+\] \S+?:\d+: ", "", text)
    text = re.sub(r"^Check failed: \(.*?\) is false: ", "", text)
    return text or type(error).__name__
