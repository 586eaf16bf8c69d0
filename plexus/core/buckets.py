"""Buckets: the fixed sizes a compiled graph is built for.

Compiled graphs have static shapes, so a batch (or a prompt) is padded up to
the smallest bucket that holds it. Every user of static shapes goes through
this one module: the CPU platform's compiled decode graphs (batch-size
buckets), CUDA graphs (capture sizes), and the Neuron platform's
context-encoding and token-generation graphs (length buckets)."""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import torch


def power_of_two_buckets(max_size: int, min_size: int = 1) -> list[int]:
    """min_size, 2*min_size, 4*min_size, ... and max_size itself (vLLM's capture sizes are similar)."""
    if max_size < 1 or min_size < 1:
        raise ValueError(f"bucket sizes must be positive, got max {max_size}, min {min_size}")
    sizes, size = [], min_size
    while size < max_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_size)
    return sizes


def validate_buckets(buckets: Iterable[int], name: str, max_value: int | None = None,
                     max_name: str = "the maximum allowed here") -> list[int]:
    """Sorted, de-duplicated positive buckets, or a ValueError naming `name` and what is allowed."""
    out = []
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"{name}: bucket {b!r} is not a positive integer")
        if max_value is not None and b > max_value:
            raise ValueError(f"{name}: bucket {b} is larger than {max_name} ({max_value})")
        out.append(b)
    if not out:
        raise ValueError(f"{name}: at least one bucket is needed")
    return sorted(set(out))


def parse_buckets(text: str, name: str, max_value: int | None = None,
                  max_name: str = "the maximum allowed here") -> list[int]:
    """Comma-separated positive integers (an environment variable's value) -> sorted buckets."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"{name}={text!r}: {part!r} is not an integer; "
                             f"expected comma-separated positive integers, e.g. 128,512,1024") from None
    return validate_buckets(values, name, max_value, max_name)


def pick_bucket(size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= size, or None when size is larger than every bucket. buckets: sorted."""
    i = bisect.bisect_left(buckets, size)
    return buckets[i] if i < len(buckets) else None


def pad_to(t: torch.Tensor, size: int, value: float | int = 0, dim: int = 0) -> torch.Tensor:
    """t padded with `value` along dim up to `size` (t itself when it is that size already)."""
    n = t.shape[dim]
    if n == size:
        return t
    if n > size:
        raise ValueError(f"cannot pad {n} rows down to a bucket of {size}")
    shape = list(t.shape)
    shape[dim] = size - n
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def padding_efficiency(sizes: Iterable[int], buckets: Sequence[int]) -> float:
    """Real over padded elements when every size is padded to its bucket (1.0 = no padding);
    sizes that fit no bucket are left out."""
    real = padded = 0
    for s in sizes:
        b = pick_bucket(s, buckets)
        if b is not None:
            real += s
            padded += b
    return real / padded if padded else 1.0
