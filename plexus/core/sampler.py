"""Sampler: logits -> tokens for a batch of requests, in plain torch.

Runs on whatever device the logits are on. The order of stages is vLLM's:

0. structured outputs: tokens the request's grammar does not allow -> -inf
   (vLLM applies the grammar's bitmask to the logits before its sampler, so
   the logprobs below are those of the constrained distribution);
1. log-probabilities of the raw logits (what the user sees as logprobs);
2. the request's own logits_processors, in order;
3. allowed_token_ids, bad_words, banned tokens (EOS/stop tokens before
   min_tokens) -> -inf; logit_bias added;
4. repetition, frequency and presence penalties;
5. greedy rows: argmax;
   random rows: temperature, top-k, top-p, min-p, then one draw by the
   exponential race argmax(p / q), q ~ Exp(1).

A seeded row draws its noise from its own generator, one row at a time, so its
tokens do not depend on what else is in the batch. Every stage gives the same
values for a row whether or not the stage's fast path skips it for the batch,
which is what keeps that promise when the batch's mix of settings changes.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from plexus.core.sampling_params import SAMPLING_EPS, SamplingParams


def uses_penalties(params: list[SamplingParams]) -> bool:
    return any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
               for p in params)


def uses_history(params: SamplingParams) -> bool:
    """Whether sampling this request's next token reads its token history (penalties, its own logits
    processors, multi-token bad words)."""
    return uses_penalties([params]) or bool(params.logits_processors) or bool(params.bad_words)


def _processes_logits(p: SamplingParams) -> bool:
    return bool(p.logits_processors) or p.allowed_token_ids is not None or bool(p.logit_bias) or bool(p.bad_words)


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [N] float32, 0.0 for greedy rows
    top_k: torch.Tensor  # [N] int64, vocab_size where disabled
    top_p: torch.Tensor  # [N] float32
    min_p: torch.Tensor  # [N] float32
    presence_penalty: torch.Tensor  # [N] float32
    frequency_penalty: torch.Tensor  # [N] float32
    repetition_penalty: torch.Tensor  # [N] float32
    generators: list[torch.Generator | None]  # per row; None -> the shared generator
    prompt_token_ids: list[list[int]] | None  # only kept when some row has penalties
    output_token_ids: list[list[int]]
    banned_token_ids: list[list[int]]  # per row, e.g. EOS + stop ids before min_tokens
    bad_words_token_ids: list[list[list[int]]]  # per row: the token ids of each bad word
    params: list[SamplingParams]  # per row: logits_processors, allowed_token_ids, logit_bias
    any_processing: bool  # some row has logits processors, allowed tokens, a logit bias or bad words
    max_num_logprobs: int  # max over rows of requested logprobs; 0 if none, -1 = vocab
    any_logprobs: bool  # some row set logprobs (0 included: the sampled token with its rank)
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    # Structured outputs: the allowed-token bitmasks of the rows that have one (core/step.py's layout).
    token_bitmask: torch.Tensor | None = None  # [R, ceil(V / 32)] int32
    token_bitmask_rows: torch.Tensor | None = None  # [R] int64: which row each bitmask belongs to

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        banned_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        bad_words_token_ids: list[list[list[int]]] | None = None,
        token_bitmasks: list[np.ndarray | None] | None = None,
    ) -> "SamplingMetadata":
        n = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators)
                == len(banned_token_ids) == n):
            raise ValueError(
                "SamplingMetadata.build needs one entry per row in every list, got "
                f"{n} params, {len(prompt_token_ids)} prompts, {len(output_token_ids)} "
                f"outputs, {len(generators)} generators, {len(banned_token_ids)} banned lists."
            )
        greedy = [p.temperature < SAMPLING_EPS for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        no_penalties = not uses_penalties(params)
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = 0
        if num_logprobs:
            max_num_logprobs = vocab_size if -1 in num_logprobs else max(num_logprobs)

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        bitmask = bitmask_rows = None
        masked = [row for row, mask in enumerate(token_bitmasks or ()) if mask is not None]
        if masked:
            bitmask = torch.from_numpy(np.stack([token_bitmasks[row] for row in masked])).to(device)
            bitmask_rows = torch.tensor(masked, dtype=torch.int64, device=device)

        return cls(
            temperature=floats([0.0 if g else p.temperature for p, g in zip(params, greedy)]),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=floats([p.top_p for p in params]),
            min_p=floats([p.min_p for p in params]),
            presence_penalty=floats([p.presence_penalty for p in params]),
            frequency_penalty=floats([p.frequency_penalty for p in params]),
            repetition_penalty=floats([p.repetition_penalty for p in params]),
            # A greedy row never draws noise, so its generator must not advance.
            generators=[None if g else gen for gen, g in zip(generators, greedy)],
            prompt_token_ids=None if no_penalties and not any(p.logits_processors for p in params)
            else prompt_token_ids,
            output_token_ids=output_token_ids,
            banned_token_ids=banned_token_ids,
            bad_words_token_ids=bad_words_token_ids or [[] for _ in params],
            params=params,
            any_processing=any(_processes_logits(p) for p in params),
            max_num_logprobs=max_num_logprobs,
            any_logprobs=bool(num_logprobs),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_penalties=no_penalties,
            no_top_k=all(k == vocab_size for k in top_k),
            no_top_p=all(p.top_p >= 1.0 for p in params),
            no_min_p=all(p.min_p <= 0.0 for p in params),
            token_bitmask=bitmask,
            token_bitmask_rows=bitmask_rows,
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [N] int64
    # Log-probability of the sampled token under the raw model distribution
    # (log_softmax of the input logits, before penalties and temperature).
    sampled_logprobs: torch.Tensor  # [N] float32
    sampled_ranks: torch.Tensor | None  # [N] int64, 1-based rank in the raw distribution; None when no
    # row asked for logprobs (ranks are only reported next to them)
    topk_token_ids: torch.Tensor | None  # [N, K], K = max_num_logprobs; None when 0
    topk_logprobs: torch.Tensor | None  # [N, K] float32


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [N, V] logits: the argmax (int64) and its log-probability (fp32)."""
    ids = logits.argmax(dim=-1)
    return ids, torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, ids[:, None])[:, 0]


class Sampler(torch.nn.Module):
    """greedy_sample: the platform's one-pass version of the function above (ModelOps.greedy_sample)."""

    def __init__(self, greedy_sample: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = greedy_sample
                 ) -> None:
        super().__init__()
        self.greedy_sample = greedy_sample

    def forward(
        self,
        logits: torch.Tensor,  # [N, V]
        metadata: SamplingMetadata,
        default_generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        if metadata.token_bitmask is not None:
            logits = apply_token_bitmask(logits, metadata.token_bitmask, metadata.token_bitmask_rows)
        if (metadata.all_greedy and metadata.no_penalties and not metadata.any_logprobs
                and not any(metadata.banned_token_ids) and not metadata.any_processing):
            # The common case (greedy, nothing to report but the token's logprob): one pass over the logits.
            sampled, sampled_logprobs = self.greedy_sample(logits)
            return SamplerOutput(sampled, sampled_logprobs, None, None, None)
        raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [N, V]
        # One float32 copy that the stages below may modify in place (none needed if no stage will).
        modifies = (not metadata.all_greedy or not metadata.no_penalties
                    or any(metadata.banned_token_ids) or metadata.any_processing)
        logits = logits.to(torch.float32, copy=modifies)

        if metadata.any_processing:
            _apply_request_processing(logits, metadata)
        _ban_tokens(logits, metadata.banned_token_ids)
        if not metadata.no_penalties:
            apply_penalties(logits, metadata)

        if metadata.all_greedy:
            sampled = logits.argmax(dim=-1)
        elif metadata.all_random:
            sampled = self._sample_random(logits, metadata, default_generator)
        else:
            greedy_sampled = logits.argmax(dim=-1)
            random_sampled = self._sample_random(logits, metadata, default_generator)
            is_greedy = metadata.temperature < SAMPLING_EPS
            sampled = torch.where(is_greedy, greedy_sampled, random_sampled)
        if metadata.any_logprobs:
            return _gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        # Nobody asked for logprobs: the sampled token's (for cumulative_logprob), without ranks.
        sampled_logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        return SamplerOutput(sampled.to(torch.int64), sampled_logprobs, None, None, None)

    def _sample_random(
        self,
        logits: torch.Tensor,  # [N, V] float32, modified in place
        metadata: SamplingMetadata,
        default_generator: torch.Generator | None,
    ) -> torch.Tensor:
        # Greedy rows divide by 1 here; their random draw is discarded.
        temperature = torch.where(metadata.temperature < SAMPLING_EPS, 1.0, metadata.temperature)
        logits.div_(temperature.unsqueeze(1))
        if not (metadata.no_top_k and metadata.no_top_p):
            logits = _apply_top_k_top_p(
                logits,
                None if metadata.no_top_k else metadata.top_k,
                None if metadata.no_top_p else metadata.top_p,
            )
        probs = torch.softmax(logits, dim=-1)  # [N, V]
        if not metadata.no_min_p:
            max_prob = probs.max(dim=-1, keepdim=True).values
            # Zeroing without renormalizing is enough: argmax(p / q) does not
            # depend on the scale of p.
            probs.masked_fill_(probs < metadata.min_p.unsqueeze(1) * max_prob, 0.0)
        return _exponential_race(probs, metadata.generators, default_generator)


def apply_token_bitmask(
    logits: torch.Tensor,  # [N, V]
    bitmask: torch.Tensor,  # [R, W] int32: bit t % 32 of word t // 32 allows token t
    rows: torch.Tensor,  # [R] int64: the row of logits each bitmask applies to
) -> torch.Tensor:
    """A copy of the logits with every token a row's bitmask does not allow at -inf (tokens past the bitmask's
    32 * W too: no grammar allows a token the tokenizer does not have). Plain torch, on any device."""
    vocab_size = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()  # [R, 32 * W]
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)
    masked = logits[rows].masked_fill(~allowed[:, :vocab_size], float("-inf"))
    return logits.index_put((rows,), masked)


def _apply_request_processing(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """In place, row by row: the request's logits processors (vLLM's callable signatures), then
    allowed_token_ids, bad words and logit_bias."""
    for row, p in enumerate(metadata.params):
        output_ids = metadata.output_token_ids[row]
        for fn in p.logits_processors or ():
            prompt_ids = metadata.prompt_token_ids[row] if metadata.prompt_token_ids is not None else []
            try:
                takes_prompt = _takes_prompt(fn)
            except TypeError:            # an unhashable callable: ask directly
                takes_prompt = _takes_prompt.__wrapped__(fn)
            result = fn(prompt_ids, output_ids, logits[row]) if takes_prompt else fn(output_ids, logits[row])
            if not isinstance(result, torch.Tensor) or result.shape != logits[row].shape:
                raise ValueError(f"a logits processor returned {type(result).__name__}"
                                 f"{tuple(getattr(result, 'shape', ()))}; it must return the row of logits, "
                                 f"shape {tuple(logits[row].shape)}")
            logits[row] = result
        if p.allowed_token_ids is not None:
            keep = logits[row, p.allowed_token_ids].clone()
            logits[row] = float("-inf")
            logits[row, p.allowed_token_ids] = keep
        for word in metadata.bad_words_token_ids[row]:
            # A word's last token is banned where the tokens before it were the last ones generated.
            prefix = word[:-1]
            if len(output_ids) >= len(prefix) and (not prefix or output_ids[-len(prefix):] == prefix):
                logits[row, word[-1]] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)


@functools.lru_cache(maxsize=1024)
def _takes_prompt(fn) -> bool:
    """vLLM's two logits-processor signatures: (output_ids, logits) or (prompt_ids, output_ids, logits).
    Asked once per processor, not at every step."""
    try:
        return len(inspect.signature(fn).parameters) == 3
    except (TypeError, ValueError):
        return False


def _ban_tokens(logits: torch.Tensor, banned_token_ids: list[list[int]]) -> None:
    rows = [row for row, ids in enumerate(banned_token_ids) for _ in ids]
    if rows:
        cols = [t for ids in banned_token_ids for t in ids]
        logits[torch.tensor(rows, device=logits.device),
               torch.tensor(cols, device=logits.device)] = float("-inf")


def _token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, V] int64: how often each token occurs in each row's list."""
    width = max((len(ids) for ids in token_ids), default=0)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.int64, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    # Pad with vocab_size, a column past the vocabulary that is dropped below.
    padded = torch.tensor(
        [ids + [vocab_size] * (width - len(ids)) for ids in token_ids],
        dtype=torch.int64, device=device,
    )  # [N, width]
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """In place: repetition over prompt + output, frequency and presence over output."""
    vocab_size = logits.shape[1]
    output_counts = _token_counts(metadata.output_token_ids, vocab_size, logits.device)
    prompt_counts = _token_counts(metadata.prompt_token_ids, vocab_size, logits.device)
    seen = (prompt_counts > 0) | (output_counts > 0)  # [N, V]
    penalty = torch.where(seen, metadata.repetition_penalty.unsqueeze(1), 1.0)
    # Shrink toward zero: divide positive logits, multiply negative ones.
    logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    logits.sub_(metadata.frequency_penalty.unsqueeze(1) * output_counts)
    logits.sub_(metadata.presence_penalty.unsqueeze(1) * (output_counts > 0))


def _apply_top_k_top_p(
    logits: torch.Tensor,  # [N, V]
    top_k: torch.Tensor | None,  # [N] int64, vocab_size = off
    top_p: torch.Tensor | None,  # [N] float32, 1.0 = off
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    vocab_size = logits.shape[1]
    if top_k is not None:
        # Keep everything at least as large as the k-th largest (ties stay).
        kth_largest = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        # Ascending cumulative mass <= 1 - p marks exactly the tokens after the
        # smallest top set whose mass reaches p; the top token always stays.
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p.unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return sorted_logits.scatter(1, order, sorted_logits)


def _exponential_race(
    probs: torch.Tensor,  # [N, V], rows need not sum to 1
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None,
) -> torch.Tensor:
    """One sample per row: argmax(p / q) with q ~ Exp(1) picks i with prob p_i / sum(p)."""
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_(generator=default_generator)
    for row, generator in enumerate(generators):
        if generator is not None:
            q[row].exponential_(generator=generator)
    # exponential_ may return exactly 0, and 0 / 0 is nan, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def _gather_logprobs(
    raw_logprobs: torch.Tensor,  # [N, V]
    sampled: torch.Tensor,  # [N] int64
    max_num_logprobs: int,
) -> SamplerOutput:
    sampled_logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1))  # [N, 1]
    # vLLM's rank: how many tokens are at least as likely as the sampled one.
    ranks = (raw_logprobs >= sampled_logprobs).sum(dim=-1)
    topk_ids = topk_logprobs = None
    vocab_size = raw_logprobs.shape[1]
    k = vocab_size if max_num_logprobs == -1 else min(max_num_logprobs, vocab_size)
    if k > 0:
        topk_logprobs, topk_ids = raw_logprobs.topk(k, dim=-1)
    return SamplerOutput(
        sampled_token_ids=sampled.to(torch.int64),
        sampled_logprobs=sampled_logprobs.squeeze(1),
        sampled_ranks=ranks.to(torch.int64),
        topk_token_ids=topk_ids,
        topk_logprobs=topk_logprobs,
    )
