"""Top-k: the same classes, scores and order as sorting every class, for every row of a request."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from service.frontend.results import softmax, top_k


def _sorting_everything(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    probabilities = softmax(logits)
    order = np.argsort(-probabilities, kind="stable")[:k]
    return order, probabilities[order]


# Few distinct values make ties at the k-th place common; NaN and long rows take the other paths.
_LOGITS = st.sampled_from([0.0, 1.0, 2.5, -3.0, np.nan])


@given(arrays(np.float32, array_shapes(min_dims=2, max_dims=2, max_side=600), elements=_LOGITS), st.integers(1, 40))
def test_top_k_matches_a_full_stable_sort_of_each_row_with_ties_and_nan(logits, k):
    ids, scores = top_k(logits, k)
    for row, row_ids, row_scores in zip(logits, ids, scores, strict=True):
        expected_ids, expected_scores = _sorting_everything(row, k)
        assert np.array_equal(row_ids, expected_ids)
        assert np.array_equal(row_scores, expected_scores, equal_nan=True)


def test_top_k_of_long_rows():
    logits = np.random.default_rng(0).standard_normal((3, 21843)).astype(np.float32)
    ids, scores = top_k(logits, 5)
    assert ids.tolist() == np.argsort(-logits, axis=-1)[:, :5].tolist()
    assert np.all(np.diff(scores, axis=-1) <= 0)
