"""Buckets: the fixed sizes a compiled graph is built for.

Compiled graphs have static shapes, so a batch (or a prompt) is padded up to
the smallest bucket that holds it. Every user of static shapes goes through
this one module: the CPU platform's compiled decode graphs (batch-size
buckets), CUDA graphs (capture sizes), and the Neuron platform's
context-encoding and token-generation graphs (length buckets)."""
from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from itertools import accumulate

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


def padding_efficiency(sizes: Iterable[int], buckets: Sequence[int],
                       counts: Iterable[int] | None = None) -> float:
    """Real over padded elements when every size is padded to its bucket (1.0 = no padding);
    sizes that fit no bucket are left out. counts[i], when given, is how often sizes[i] occurs,
    so a histogram need not be expanded."""
    real = padded = 0
    for s, c in _with_counts(sizes, counts):
        b = pick_bucket(s, buckets)
        if b is not None:
            real += c * s
            padded += c * b
    return real / padded if padded else 1.0


def _with_counts(sizes: Iterable[int], counts: Iterable[int] | None) -> Iterable[tuple[int, int]]:
    return ((s, 1) for s in sizes) if counts is None else zip(sizes, counts, strict=True)


def optimal_buckets(sizes: Iterable[int], max_buckets: int, counts: Iterable[int] | None = None,
                    multiple_of: int = 1, max_value: int | None = None,
                    largest_at_least: int | None = None) -> list[int]:
    """At most max_buckets buckets that minimize the padded total sum(count * pick_bucket(size)),
    the largest holding max(sizes) and largest_at_least (a size that must fit but costs nothing,
    such as a prompt the KV cache holds without any decode step). Buckets are multiples of
    multiple_of (compilers tile better) except max_value itself, which no bucket exceeds.

    Exact, not a heuristic: an optimal bucket can always shrink to the rounded-up largest size it
    holds, so the buckets lie among the distinct rounded sizes and the answer is the optimal
    partition of those into contiguous groups, by dynamic programming. Each DP row is a minimum
    over lines evaluated at increasing points, taken with the convex hull trick in O(n) rather than
    O(n^2): token-generation sizes run to max_model_len distinct values."""
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be at least 1, got {max_buckets}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be at least 1, got {multiple_of}")

    def rounded(size: int) -> int:
        if max_value is not None and size > max_value:
            raise ValueError(f"size {size} is larger than the largest bucket allowed ({max_value})")
        bucket = -(-size // multiple_of) * multiple_of
        return bucket if max_value is None else min(bucket, max_value)

    weight: Counter[int] = Counter()
    for s, c in _with_counts(sizes, counts):
        if s < 1 or c < 1:
            raise ValueError(f"sizes and counts must be positive, got size {s} with count {c}")
        weight[rounded(s)] += c
    values = sorted(weight)
    if largest_at_least is not None and (not values or rounded(largest_at_least) > values[-1]):
        # Weightless, so only ever the last value: the DP's slopes stay strictly decreasing.
        values.append(rounded(largest_at_least))
    if not values:
        raise ValueError("optimal_buckets needs at least one size")
    n, k = len(values), min(max_buckets, len(values))
    below = list(accumulate((weight[v] for v in values), initial=0))  # below[j]: weight of values[:j]

    # best[j]: least padded total of values[:j] in t buckets, the last one values[j-1]; one bucket first.
    # best_t[j] = min over i of best_{t-1}[i] + values[j-1] * (below[j] - below[i]), i.e.
    # values[j-1] * below[j] plus the lowest line (slope -below[i], intercept best_{t-1}[i]) at x = values[j-1].
    best = [0] + [values[j - 1] * below[j] for j in range(1, n + 1)]
    split = [[0] * (n + 1)]  # split[t-1][j]: the i that achieves best_t[j]
    for t in range(2, k + 1):
        row, arg = [0] * (n + 1), [0] * (n + 1)
        hull: deque[tuple[int, int, int]] = deque()  # (slope, intercept, i), slopes decreasing
        for j in range(t, n + 1):
            _add_line(hull, (-below[j - 1], best[j - 1], j - 1))
            x = values[j - 1]
            while len(hull) > 1 and hull[1][0] * x + hull[1][1] <= hull[0][0] * x + hull[0][1]:
                hull.popleft()  # x only grows and later slopes are steeper: hull[0] never wins again
            slope, intercept, i = hull[0]
            row[j], arg[j] = slope * x + intercept + x * below[j], i
        best = row
        split.append(arg)

    chosen, j = [], n
    for arg in reversed(split):
        chosen.append(values[j - 1])
        j = arg[j]
    return sorted(chosen)


def _add_line(hull: deque, line: tuple[int, int, int]) -> None:
    """Append a line of smaller slope, first dropping lines that are nowhere lowest any more.
    Integer cross-multiplication keeps the comparison exact."""
    m3, c3, _ = line
    while len(hull) > 1:
        (m1, c1, _), (m2, c2, _) = hull[-2], hull[-1]
        # hull[-1] is lowest only right of where it crosses hull[-2] and left of where line crosses hull[-2]
        if (c3 - c1) * (m1 - m2) <= (c2 - c1) * (m1 - m3):
            hull.pop()
        else:
            break
    hull.append(line)
