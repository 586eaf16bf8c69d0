"""The sampler draws from the distribution vLLM's parameters describe.

Expected distributions are computed here with numpy, independently of the
sampler's torch code, and compared by chi-square over many draws.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from plexus.core.sampler import Sampler, SamplingMetadata, apply_penalties
from plexus.core.sampling_params import SamplingParams

# 12 distinct logits, deliberately not sorted so index mix-ups show.
LOGITS = np.array([1.7, -0.6, 2.4, 0.4, -2.7, 1.2, -1.1, 3.0, 0.0, -1.9, 2.1, 0.9])
VOCAB = len(LOGITS)
NUM_DRAWS = 60_000


def expected_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """numpy reference: temperature, then top-k, top-p, min-p, renormalizing after each."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)  # most likely first
    if top_k > 0:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    if top_p < 1.0:
        ranked = p[order]
        mass_before = np.cumsum(ranked) - ranked  # mass of strictly more likely tokens
        # A token stays while the tokens above it have not yet reached top_p.
        assert np.all(np.abs(mass_before - top_p) > 1e-3), "logits too close to the top_p boundary"
        p[order[mass_before >= top_p]] = 0.0
        p /= p.sum()
    if min_p > 0.0:
        p[p < min_p * p.max()] = 0.0
        p /= p.sum()
    return p


def build(params, vocab_size, prompts=None, outputs=None, generators=None, banned=None):
    n = len(params)
    return SamplingMetadata.build(
        params,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        generators=generators if generators is not None else [None] * n,
        banned_token_ids=banned if banned is not None else [[] for _ in range(n)],
        vocab_size=vocab_size,
        device="cpu",
    )


def draw_counts(params, logits=LOGITS, num_draws=NUM_DRAWS, seed=0, **build_kwargs):
    """Token counts of num_draws identical rows sampled in one call."""
    batch = torch.tensor(logits, dtype=torch.float32).expand(num_draws, -1).contiguous()
    metadata = build([params] * num_draws, len(logits), **build_kwargs)
    out = Sampler()(batch, metadata, default_generator=torch.Generator().manual_seed(seed))
    return np.bincount(out.sampled_token_ids.numpy(), minlength=len(logits))


def assert_matches(counts, expected):
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, (
        f"tokens outside the allowed set were sampled: {np.nonzero(counts * ~allowed)[0]}"
    )
    f_exp = expected[allowed] / expected[allowed].sum() * counts.sum()
    p_value = chisquare(counts[allowed], f_exp).pvalue
    assert p_value > 1e-3, f"observed {counts}, expected {np.round(f_exp)}; p={p_value:.2e}"


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=0.7),
        dict(top_k=5),
        dict(top_p=0.8),
        dict(min_p=0.1),
        # Each stage cuts something here: top-k 12 -> 8, top-p 8 -> 5, min-p 5 -> 4.
        dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.12),
    ],
    ids=["temperature", "top_k", "top_p", "min_p", "combined"],
)
def test_samples_follow_the_truncated_tempered_distribution(knobs):
    counts = draw_counts(SamplingParams(**knobs))
    assert_matches(counts, expected_distribution(LOGITS, **knobs))


def test_chi_square_check_rejects_the_wrong_distribution():
    # The comparison has power: temperature 0.7 draws are not temperature 1 draws.
    counts = draw_counts(SamplingParams(temperature=0.7))
    untempered = expected_distribution(LOGITS) * counts.sum()
    assert chisquare(counts, untempered).pvalue < 1e-6


def test_min_p_applies_after_top_p():
    # With min-p first, the renormalized mass would let top-p drop a 4th token.
    knobs = dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.12)
    counts = draw_counts(SamplingParams(**knobs))
    assert (expected_distribution(LOGITS, **knobs) > 0).sum() == 4
    assert (counts > 0).sum() == 4


def test_top_k_minus_one_or_above_vocab_disables_top_k():
    for top_k in (-1, VOCAB + 5):
        counts = draw_counts(SamplingParams(top_k=top_k), num_draws=20_000)
        assert_matches(counts, expected_distribution(LOGITS))


def test_greedy_rows_pick_the_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=gen)
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=1.0)] * 3
    out = Sampler()(logits, build(params, 50))
    assert out.sampled_token_ids[:3].tolist() == logits[:3].argmax(dim=-1).tolist()

    all_greedy = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 6, 50))
    assert all_greedy.sampled_token_ids.tolist() == logits.argmax(dim=-1).tolist()


def test_penalties_change_logits_by_the_formulas():
    logits = torch.tensor([
        [2.0, -1.0, 0.5, -0.5, 1.0, 3.0],
        [2.0, -1.0, 0.5, -0.5, 1.0, 3.0],
    ])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # same tokens, no penalties: must be left alone
    ]
    metadata = build(params, 6, prompts=[[0, 1], [0, 1]], outputs=[[2, 2, 3], [2, 2, 3]])
    apply_penalties(logits, metadata)
    # Row 0 by hand. Repetition over prompt + output {0, 1, 2, 3}: positive
    # logits / 2, negative * 2 -> [1.0, -2.0, 0.25, -1.0, 1.0, 3.0]. Then output
    # counts {2: 2, 3: 1}: token 2 -= 0.5 * 2 + 0.25, token 3 -= 0.5 * 1 + 0.25.
    assert logits[0].tolist() == [1.0, -2.0, -1.0, -1.75, 1.0, 3.0]
    assert logits[1].tolist() == [2.0, -1.0, 0.5, -0.5, 1.0, 3.0]


def test_presence_and_frequency_penalties_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    metadata = build(
        [SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)], 4,
        prompts=[[0, 0, 1]], outputs=[[1]],
    )
    apply_penalties(logits, metadata)
    assert logits[0].tolist() == [0.0, -2.0, 0.0, 0.0]


def test_penalized_logits_drive_sampling():
    knobs = dict(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    prompt, output = [7, 2], [10, 10, 4]
    counts = draw_counts(
        SamplingParams(**knobs), num_draws=40_000,
        prompts=[prompt] * 40_000, outputs=[output] * 40_000,
    )
    penalized = LOGITS.copy()
    for t in set(prompt) | set(output):
        penalized[t] = penalized[t] / 1.5 if penalized[t] > 0 else penalized[t] * 1.5
    for t in set(output):
        penalized[t] -= 0.3 * output.count(t) + 0.2
    assert_matches(counts, expected_distribution(penalized))


def test_greedy_argmax_sees_the_penalties():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    metadata = build([SamplingParams(temperature=0.0, repetition_penalty=2.0)], 3,
                     prompts=[[0]], outputs=[[]])
    assert Sampler()(logits, metadata).sampled_token_ids.tolist() == [1]


def test_banned_tokens_are_never_sampled():
    banned = [7, 2]  # the two most likely tokens
    counts = draw_counts(SamplingParams(), num_draws=20_000, banned=[banned] * 20_000)
    masked = LOGITS.copy()
    masked[banned] = -np.inf
    assert_matches(counts, expected_distribution(masked))

    greedy = build([SamplingParams(temperature=0.0)], VOCAB, banned=[banned])
    out = Sampler()(torch.tensor(LOGITS[None], dtype=torch.float32), greedy)
    assert out.sampled_token_ids.tolist() == [10]  # the best token left


def _other_rows(vocab):
    """16 rows with settings unlike the seeded row's, two of them seeded too."""
    rows = []
    for i in range(16):
        kind = i % 6
        if kind == 0:
            rows.append(SamplingParams(temperature=0.0))
        elif kind == 1:
            rows.append(SamplingParams(top_k=3, temperature=1.3))
        elif kind == 2:
            rows.append(SamplingParams(top_p=0.5, min_p=0.2))
        elif kind == 3:
            rows.append(SamplingParams(presence_penalty=1.0, frequency_penalty=-0.5, logprobs=3))
        elif kind == 4:
            rows.append(SamplingParams(seed=100 + i, temperature=0.6))
        else:
            rows.append(SamplingParams(repetition_penalty=0.7, top_k=vocab // 2))
    return rows


def _seeded_run(seed, vocab, steps, position=None):
    """Tokens of one seeded row over several steps, alone or at `position` in a batch."""
    target = SamplingParams(seed=seed, temperature=0.9, top_p=0.95, repetition_penalty=1.1)
    logits_gen = torch.Generator().manual_seed(7)
    noise_gen = torch.Generator().manual_seed(12345)  # the batch's shared generator
    generator = torch.Generator().manual_seed(seed)
    others = _other_rows(vocab)
    other_generators = [
        torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in others
    ]
    other_outputs = [[] for _ in others]
    prompt, tokens = [1, 2, 3], []
    for _ in range(steps):
        step_logits = torch.randn(len(others) + 1, vocab, generator=logits_gen) * 3
        if position is None:
            params, gens, outputs = [target], [generator], [tokens]
            logits = step_logits[:1]
        else:
            params = others[:position] + [target] + others[position:]
            gens = other_generators[:position] + [generator] + other_generators[position:]
            outputs = other_outputs[:position] + [tokens] + other_outputs[position:]
            logits = torch.cat([step_logits[1:position + 1], step_logits[:1],
                                step_logits[position + 1:]])
        metadata = build(params, vocab, prompts=[prompt] * len(params),
                         outputs=[list(o) for o in outputs], generators=gens)
        sampled = Sampler()(logits, metadata, default_generator=noise_gen).sampled_token_ids
        row = 0 if position is None else position
        for o, t in zip(outputs, sampled.tolist()):
            o.append(t)
        assert tokens[-1] == sampled[row].item()
    return tokens


def test_seeded_row_is_the_same_alone_or_in_a_batch():
    alone = _seeded_run(seed=42, vocab=64, steps=8)
    in_batch = _seeded_run(seed=42, vocab=64, steps=8, position=7)
    at_front = _seeded_run(seed=42, vocab=64, steps=8, position=0)
    assert alone == in_batch == at_front
    # ...and the seed is what decides it.
    assert _seeded_run(seed=43, vocab=64, steps=8) != alone


def test_unseeded_rows_follow_the_default_generator():
    logits = torch.zeros(32, 100)
    metadata = build([SamplingParams()] * 32, 100)
    first = Sampler()(logits, metadata, torch.Generator().manual_seed(5)).sampled_token_ids
    again = Sampler()(logits, metadata, torch.Generator().manual_seed(5)).sampled_token_ids
    other = Sampler()(logits, metadata, torch.Generator().manual_seed(6)).sampled_token_ids
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_logprobs_are_those_of_the_raw_model_distribution():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 64, generator=gen) * 2
    # Bans, penalties and temperature change what is sampled, not what is reported.
    params = [SamplingParams(logprobs=5, temperature=0.5, presence_penalty=1.0)] * 4 + [
        SamplingParams(logprobs=2, temperature=0.0)] * 4
    most_likely = logits.argmax(dim=-1)
    metadata = build(params, 64, outputs=[[0, 1, 2]] * 8,
                     banned=[[t] for t in most_likely.tolist()])
    assert metadata.max_num_logprobs == 5
    out = Sampler()(logits, metadata, torch.Generator().manual_seed(0))

    reference = torch.log_softmax(logits, dim=-1)
    tokens = out.sampled_token_ids
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.sampled_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.sampled_logprobs, reference[torch.arange(8), tokens])
    expected_ranks = (reference > reference[torch.arange(8), tokens].unsqueeze(1)).sum(-1) + 1
    assert out.sampled_ranks.tolist() == expected_ranks.tolist()
    assert min(out.sampled_ranks.tolist()) >= 2  # the banned top token was not sampled
    top_values, top_ids = torch.topk(reference, 5)
    assert out.topk_token_ids.tolist() == top_ids.tolist()
    torch.testing.assert_close(out.topk_logprobs, top_values)


def test_greedy_token_has_rank_one():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(9))
    out = Sampler()(logits, build([SamplingParams(temperature=0.0, logprobs=0)] * 4, 30))
    assert out.sampled_ranks.tolist() == [1, 1, 1, 1]
    assert out.topk_token_ids is None and out.topk_logprobs is None


def test_without_logprobs_only_the_sampled_logprob_is_computed():
    """The fast path (no [N, V] log_softmax, no ranks) reports the same sampled logprob."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(9))
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 4, 30))
    reference = torch.log_softmax(logits, dim=-1)
    assert out.sampled_ranks is None and out.topk_token_ids is None
    torch.testing.assert_close(out.sampled_logprobs, reference[torch.arange(4), logits.argmax(-1)])


def test_logprobs_minus_one_returns_the_whole_vocabulary():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(4))
    metadata = build([SamplingParams(logprobs=-1), SamplingParams()], 20)
    assert metadata.max_num_logprobs == 20
    out = Sampler()(logits, metadata)
    assert out.topk_logprobs.shape == (2, 20)
    torch.testing.assert_close(out.topk_logprobs.exp().sum(-1), torch.ones(2))


def test_half_precision_logits_are_sampled_in_float32_and_left_untouched():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    before = logits.clone()
    metadata = build([SamplingParams(logprobs=1, repetition_penalty=1.3, top_k=4)] * 3, 40,
                     prompts=[[0, 1]] * 3, banned=[[5]] * 3)
    out = Sampler()(logits, metadata)
    assert torch.equal(logits, before)
    assert out.sampled_logprobs.dtype == torch.float32
    assert 5 not in out.sampled_token_ids.tolist()


def test_metadata_marks_disabled_stages_and_greedy_rows():
    params = [
        SamplingParams(temperature=0.0, seed=1),
        SamplingParams(top_k=-1, seed=2),
        SamplingParams(top_k=100, logprobs=3),
    ]
    gens = [torch.Generator(), torch.Generator(), None]
    metadata = build(params, 50, generators=gens)
    assert metadata.temperature.tolist() == [0.0, 1.0, 1.0]
    assert metadata.top_k.tolist() == [50, 50, 50]
    # A greedy row draws no noise, so its generator is dropped and never advances.
    assert metadata.generators[0] is None and metadata.generators[1] is gens[1]
    assert (metadata.all_greedy, metadata.all_random) == (False, False)
    assert metadata.no_top_k and metadata.no_top_p and metadata.no_min_p
    assert metadata.no_penalties and metadata.prompt_token_ids is None
    assert metadata.max_num_logprobs == 3

    penalized = build([SamplingParams(top_k=5, repetition_penalty=1.2)], 50, prompts=[[3]])
    assert not penalized.no_top_k and not penalized.no_penalties
    assert penalized.prompt_token_ids == [[3]] and penalized.all_random
