"""The one bucketing module that compiled graphs (CPU, CUDA) and Neuron buckets share."""
import itertools
import random

import pytest
import torch

from plexus.core import buckets


def test_power_of_two_buckets_end_at_the_maximum():
    assert buckets.power_of_two_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets.power_of_two_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets.power_of_two_buckets(1) == [1]
    assert buckets.power_of_two_buckets(2048, min_size=128) == [128, 256, 512, 1024, 2048]


def test_pick_bucket_is_the_smallest_that_fits():
    sizes = [1, 4, 16]
    assert [buckets.pick_bucket(n, sizes) for n in (1, 2, 4, 5, 16, 17)] == [1, 4, 4, 16, 16, None]


def test_pad_to_pads_the_chosen_dimension():
    t = torch.tensor([[1, 2], [3, 4]])
    assert buckets.pad_to(t, 2) is t
    assert buckets.pad_to(t, 3, value=9).tolist() == [[1, 2], [3, 4], [9, 9]]
    assert buckets.pad_to(t, 3, dim=1).tolist() == [[1, 2, 0], [3, 4, 0]]
    with pytest.raises(ValueError, match="cannot pad 2 rows down to a bucket of 1"):
        buckets.pad_to(t, 1)


def test_parse_and_validate_name_the_setting():
    assert buckets.parse_buckets("512, 128,128,2048", "NEURON_CONTEXT_LENGTH_BUCKETS") == [128, 512, 2048]
    with pytest.raises(ValueError, match=r"NEURON_TOKEN_GEN_BUCKETS='128,x': 'x' is not an integer"):
        buckets.parse_buckets("128,x", "NEURON_TOKEN_GEN_BUCKETS")
    with pytest.raises(ValueError, match="SIZES: bucket 0 is not a positive integer"):
        buckets.validate_buckets([0, 4], "SIZES")
    with pytest.raises(ValueError, match=r"SIZES: bucket 4096 is larger than the maximum allowed here \(2048\)"):
        buckets.validate_buckets([4096], "SIZES", max_value=2048)
    with pytest.raises(ValueError, match="at least one bucket"):
        buckets.validate_buckets([], "SIZES")


def test_padding_efficiency():
    assert buckets.padding_efficiency([100, 128, 300], [128, 512]) == pytest.approx(528 / 768)
    assert buckets.padding_efficiency([4, 4], [4]) == 1.0


def test_padding_efficiency_counts_weight_each_size():
    assert buckets.padding_efficiency([100, 300], [128, 512], counts=[3, 1]) == pytest.approx(600 / 896)
    with pytest.raises(ValueError):
        buckets.padding_efficiency([100, 300], [128, 512], counts=[3])


def _padded(sizes, counts, chosen):
    return sum(c * buckets.pick_bucket(s, chosen) for s, c in zip(sizes, counts))


def test_optimal_buckets_match_brute_force_over_every_bucket_choice():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(1, 20) for _ in range(rng.randint(1, 7))]
        counts = [rng.randint(1, 5) for _ in sizes]
        max_buckets, multiple_of = rng.randint(1, 4), rng.choice([1, 3, 8])
        must_fit = max(sizes) + rng.choice([0, 0, rng.randint(1, 6)])
        cap = rng.choice([None, must_fit + rng.randint(0, 4)])
        allowed = {b for b in range(multiple_of, must_fit + multiple_of, multiple_of) if cap is None or b <= cap}
        allowed |= set() if cap is None else {cap}
        brute = min(_padded(sizes, counts, choice)
                    for n in range(1, max_buckets + 1) for choice in itertools.combinations(sorted(allowed), n)
                    if choice[-1] >= must_fit)

        got = buckets.optimal_buckets(sizes, max_buckets, counts, multiple_of, cap, largest_at_least=must_fit)

        assert len(got) <= max_buckets and got == sorted(set(got)) and got[-1] >= must_fit
        assert all(b % multiple_of == 0 or b == cap for b in got) and (cap is None or got[-1] <= cap)
        assert _padded(sizes, counts, got) == brute


def test_optimal_buckets_worked_example():
    # {300, 1000} pads 100 and 128 to 300: 2900 in all; {128, 1000} would pad 300 to 1000: 3256.
    assert buckets.optimal_buckets([100, 128, 300, 1000, 1000], 2) == [300, 1000]
    assert buckets.optimal_buckets([100, 128, 300], 2, counts=[1, 1, 5]) == [128, 300]
    assert buckets.optimal_buckets([100, 128, 300], 9) == [100, 128, 300]
    # Rounded to 128: sizes 128 (once), 256 (three times), 384 (once).
    assert buckets.optimal_buckets([100, 130, 300], 2, [1, 3, 1], multiple_of=128) == [256, 384]
    assert buckets.optimal_buckets([100, 130, 300], 2, [1, 3, 1], multiple_of=128, max_value=300) == [256, 300]
    # A size that must fit but weighs nothing takes the last bucket only when nothing larger holds it.
    assert buckets.optimal_buckets([100, 128, 300], 2, largest_at_least=200) == [128, 300]
    assert buckets.optimal_buckets([100, 128, 300], 2, largest_at_least=1000) == [300, 1000]
    assert buckets.optimal_buckets([], 2, largest_at_least=1000) == [1000]


def test_optimal_buckets_reject_what_they_cannot_place():
    with pytest.raises(ValueError, match="size 600 is larger than the largest bucket allowed \\(512\\)"):
        buckets.optimal_buckets([100, 600], 2, max_value=512)
    with pytest.raises(ValueError, match="max_buckets must be at least 1"):
        buckets.optimal_buckets([100], 0)
    with pytest.raises(ValueError, match="at least one size"):
        buckets.optimal_buckets([], 2)


def test_optimal_buckets_scale_to_every_position_of_a_long_context():
    sizes = range(1, 32769)
    got = buckets.optimal_buckets(sizes, 8)
    # Uniform sizes: equal-width buckets are optimal.
    assert got == [4096 * i for i in range(1, 9)]
