"""Bucket advice: context and token-generation buckets fitted to the requests a server really sees.

transformers-neuronx compiles one graph per bucket, so every bucket costs compile time and device
memory, and every token between a size and its bucket is wasted work. Given observed
(prompt_len, output_len) pairs this proposes the buckets that waste the fewest tokens.

What a request needs: a prompt of p tokens runs in the smallest context bucket >= p. The first
output token comes from that context step; decode step k (1 <= k < o) feeds output token k at
position p+k-1, so it runs in the smallest token-gen bucket >= p+k. A request with output o therefore
needs token-gen sizes p+1 .. p+o-1 (none when o <= 1) and keeps a sequence of p + max(o-1, 0)
tokens in a KV cache as long as the largest token-gen bucket (n_positions). It cannot be served when
p exceeds the largest context bucket or its sequence the largest token-gen bucket. Each sequence is
counted on its own: in a batch the longest sequence picks the bucket for all, which depends on the
scheduler's mix."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plexus.core import buckets

EXPECTED_LINE = ('{"prompt_len": int, "output_len": int} or OpenAI usage '
                 '{"prompt_tokens": int, "completion_tokens": int}, also nested under "usage"')


@dataclass(frozen=True)
class BucketFit:
    """How one choice of buckets serves the observed requests. The efficiencies are real tokens over
    padded tokens (1.0 = no padding) over the requests it can serve."""
    context_buckets: list[int]
    token_gen_buckets: list[int]
    context_efficiency: float
    token_gen_efficiency: float
    unservable: int


@dataclass(frozen=True)
class BucketAdvice:
    """Proposed buckets next to the current ones, both scored on the same num_requests requests."""
    proposed: BucketFit
    current: BucketFit
    num_requests: int


def load_request_lengths(path: str | Path) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs from a JSONL file, one request a line; blank lines are skipped."""
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg}); expected {EXPECTED_LINE}") from None
            pair = _lengths(record)
            if pair is None:
                raise ValueError(f"{path}:{lineno}: expected {EXPECTED_LINE} with prompt >= 1 and "
                                 f"output >= 0, got {line.strip()[:120]}")
            requests.append(pair)
    if not requests:
        raise ValueError(f"{path}: no requests; expected one JSON object a line: {EXPECTED_LINE}")
    return requests


def _lengths(record: object) -> tuple[int, int] | None:
    if isinstance(record, dict) and isinstance(record.get("usage"), dict):
        record = record["usage"]
    if not isinstance(record, dict):
        return None
    for prompt_key, output_key in (("prompt_len", "output_len"), ("prompt_tokens", "completion_tokens")):
        p, o = record.get(prompt_key), record.get(output_key)
        if _is_int(p) and _is_int(o) and p >= 1 and o >= 0:
            return p, o
    return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def advise_buckets(requests: Sequence[tuple[int, int]], max_buckets: int = 4, *,
                   max_context_buckets: int | None = None, max_token_gen_buckets: int | None = None,
                   multiple_of: int = 1, max_model_len: int | None = None,
                   current_context_buckets: Sequence[int] | None = None,
                   current_token_gen_buckets: Sequence[int] | None = None) -> BucketAdvice:
    """Context and token-gen buckets (at most max_buckets of each unless max_context_buckets /
    max_token_gen_buckets say otherwise) with the fewest padded tokens over `requests`, and how they
    compare with the current buckets.

    The proposal is optimal for its bucket counts, its largest buckets hold the longest prompt and
    sequence, and each bucket is a multiple of multiple_of or max_model_len itself. Requests that need
    more than max_model_len are unservable under any buckets and are left out of the fit. The current
    buckets default, as on Neuron, to [max_model_len], or without it to the longest observed size."""
    requests = [_checked(i, r) for i, r in enumerate(requests)]
    if not requests:
        raise ValueError("advise_buckets needs at least one (prompt_len, output_len) request")
    max_context_buckets = max_buckets if max_context_buckets is None else max_context_buckets
    max_token_gen_buckets = max_buckets if max_token_gen_buckets is None else max_token_gen_buckets
    for name, value in (("max_context_buckets", max_context_buckets),
                        ("max_token_gen_buckets", max_token_gen_buckets), ("multiple_of", multiple_of),
                        ("max_model_len", 1 if max_model_len is None else max_model_len)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    longest = max(_sequence_len(p, o) for p, o in requests)
    cap = longest if max_model_len is None else max_model_len
    current = evaluate_buckets(
        requests,
        buckets.validate_buckets([cap] if current_context_buckets is None else current_context_buckets,
                                 "current_context_buckets", max_model_len, "max_model_len"),
        buckets.validate_buckets([cap] if current_token_gen_buckets is None else current_token_gen_buckets,
                                 "current_token_gen_buckets", max_model_len, "max_model_len"))

    fitting = [(p, o) for p, o in requests if _sequence_len(p, o) <= cap]
    if not fitting:
        raise ValueError(f"none of the {len(requests)} requests fits in max_model_len={max_model_len}")
    prompts = Counter(p for p, _ in fitting)
    context = buckets.optimal_buckets(prompts.keys(), max_context_buckets, prompts.values(),
                                      multiple_of, max_model_len)
    token_gen_sizes, token_gen_counts = _decode_histogram(fitting)
    # A request without decode steps still needs its prompt to fit the KV cache, hence largest_at_least.
    token_gen = buckets.optimal_buckets(token_gen_sizes, max_token_gen_buckets, token_gen_counts, multiple_of,
                                        max_model_len, max(_sequence_len(p, o) for p, o in fitting))
    return BucketAdvice(evaluate_buckets(requests, context, token_gen), current, len(requests))


def evaluate_buckets(requests: Sequence[tuple[int, int]], context_buckets: Sequence[int],
                     token_gen_buckets: Sequence[int]) -> BucketFit:
    """Padding efficiency of each kind over the requests these (sorted) buckets serve, and how many
    they refuse."""
    served = [(p, o) for p, o in requests
              if p <= context_buckets[-1] and _sequence_len(p, o) <= token_gen_buckets[-1]]
    prompts = Counter(p for p, _ in served)
    token_gen_sizes, token_gen_counts = _decode_histogram(served)
    return BucketFit(
        list(context_buckets), list(token_gen_buckets),
        buckets.padding_efficiency(prompts.keys(), context_buckets, prompts.values()),
        buckets.padding_efficiency(token_gen_sizes, token_gen_buckets, token_gen_counts),
        len(requests) - len(served))


def _sequence_len(prompt_len: int, output_len: int) -> int:
    """Tokens in the KV cache at the last step; the last output token is sampled, never fed back."""
    return prompt_len + max(output_len - 1, 0)


def _decode_histogram(requests: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The distinct token-gen sizes and how many decode steps need each: every request adds one step
    at each of p+1 .. p+o-1, summed with a difference array instead of expanding the ranges."""
    ranges = [(p + 1, p + o - 1) for p, o in requests if o >= 2]
    if not ranges:
        return [], []
    starts, ends = np.array(ranges, dtype=np.int64).T
    steps = np.zeros(int(ends.max()) + 2, dtype=np.int64)
    np.add.at(steps, starts, 1)
    np.add.at(steps, ends + 1, -1)
    steps = np.cumsum(steps)
    sizes = np.flatnonzero(steps)
    return sizes.tolist(), steps[sizes].tolist()


def _checked(index: int, request: tuple[int, int]) -> tuple[int, int]:
    p, o = request
    if not (_is_int(p) and _is_int(o) and p >= 1 and o >= 0):
        raise ValueError(f"request {index}: expected (prompt_len >= 1, output_len >= 0) integers, got {request!r}")
    return p, o
