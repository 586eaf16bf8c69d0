"""The one bucketing module that compiled graphs (CPU, CUDA) and Neuron buckets share."""
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
