"""The one percentile (nearest rank) of the demo, the campaigns and the benchmarks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from connmgr.metrics import percentile


def test_nearest_rank_examples():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0.0, 0.2, 0.21, 0.5, 0.99, 1.0)] == [1.0, 1.0, 2.0, 3.0, 5.0, 5.0]
    assert percentile([], 0.99) == 0.0
    assert percentile([7.0] * 100 + [9.0], 0.99) == 7.0  # 100 of 101 are at or below 7


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1), st.floats(0, 1))
def test_it_is_the_smallest_value_with_q_of_them_at_or_below(values, q):
    p = percentile(values, q)
    assert p in values
    assert sum(v <= p for v in values) >= q * len(values) - 1e-9
    assert all(sum(w <= v for w in values) < q * len(values) - 1e-9 for v in values if v < p)
