"""Property tests of the pure mask math (peft_cofi.mask)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peft_cofi.mask import combine_importance, mask_factors, normalize_importance, pool_heads

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
scores_st = st.lists(finite, min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32))
sharpness_st = st.floats(min_value=0.01, max_value=10.0)
norm_st = st.sampled_from(["abs", "positive"])


@given(scores_st, sharpness_st, norm_st)
def test_importance_in_unit_interval_and_finite(scores, sharpness, normalization):
    importance = normalize_importance(scores, sharpness, normalization)
    assert importance.shape == scores.shape
    assert torch.isfinite(importance).all()
    assert ((importance >= 0) & (importance <= 1)).all()


@given(scores_st, sharpness_st)
def test_positive_normalization_is_monotone_in_raw_score(scores, sharpness):
    importance = normalize_importance(scores, sharpness, "positive")
    order = torch.argsort(scores.double(), stable=True)
    assert (importance[order].diff() >= -1e-6).all()


@given(scores_st, sharpness_st)
def test_abs_normalization_is_monotone_in_distance_from_mean(scores, sharpness):
    importance = normalize_importance(scores, sharpness, "abs")
    distance = (scores.double() - scores.double().mean()).abs()
    order = torch.argsort(distance, stable=True)
    assert (importance[order].diff() >= -1e-6).all()


@given(scores_st, st.floats(0.05, 5.0), st.floats(0.05, 5.0))
def test_smaller_sharpness_protects_more(scores, t1, t2):
    assume(t1 < t2)
    assert (normalize_importance(scores, t1) >= normalize_importance(scores, t2) - 1e-6).all()


@given(finite, st.integers(1, 50), sharpness_st, norm_st)
def test_constant_or_single_unit_module_gets_zero_importance(value, n, sharpness, normalization):
    scores = torch.full((n,), value)
    assert torch.equal(normalize_importance(scores, sharpness, normalization), torch.zeros(n))
    assert torch.equal(mask_factors([scores], sharpness, normalization), torch.ones(n))


@given(st.integers(0, 9), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_scores_raise(position, bad):
    scores = torch.rand(10)
    scores[position] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        mask_factors([scores])


@given(st.lists(scores_st, min_size=1, max_size=4), sharpness_st)
def test_combination_is_elementwise_max(sets, sharpness):
    n = sets[0].numel()
    sets = [s[:n] for s in sets if s.numel() >= n]
    normalized = [normalize_importance(s, sharpness) for s in sets]
    combined = combine_importance(normalized)
    for one in normalized:
        assert (combined >= one).all()
    assert (torch.stack(normalized) == combined).any(dim=0).all()
    # the factors of the combination are the smallest factor of any set
    factors = mask_factors(sets, sharpness)
    assert torch.allclose(factors, torch.stack([mask_factors([s], sharpness) for s in sets]).amin(0))


def test_paper_normalisation_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    z = (scores - 2.5) / scores.std(unbiased=False)
    assert torch.allclose(normalize_importance(scores), torch.tanh(z.abs()))
    assert torch.allclose(mask_factors([scores]), 1 - torch.tanh(z.abs()))


@given(st.integers(1, 6), st.integers(1, 8), st.data())
def test_per_row_scores_pool_to_head_means_and_expand_back(num_heads, head_dim, data):
    rows = num_heads * head_dim
    scores = torch.tensor(data.draw(st.lists(st.floats(0, 100), min_size=rows, max_size=rows)))
    pooled = pool_heads(scores, rows, head_dim)
    assert torch.allclose(pooled, scores.reshape(num_heads, head_dim).mean(1))
    factors = mask_factors([scores], head_dim=head_dim, out_features=rows)
    assert factors.shape == (rows,)
    # every row of a head shares the head's factor
    assert (factors.reshape(num_heads, head_dim) == factors.reshape(num_heads, head_dim)[:, :1]).all()


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.data())
def test_gqa_kv_head_takes_max_over_its_query_heads(num_kv_heads, group, head_dim, data):
    num_query_heads = num_kv_heads * group
    assume(num_query_heads not in (num_kv_heads, num_kv_heads * head_dim))  # those read as per-head / per-row
    query_scores = torch.tensor(
        data.draw(st.lists(st.floats(0, 100), min_size=num_query_heads, max_size=num_query_heads))
    )
    pooled = pool_heads(query_scores, num_kv_heads * head_dim, head_dim, num_query_heads)
    for kv in range(num_kv_heads):
        assert pooled[kv] == query_scores[kv * group : (kv + 1) * group].max()


def test_pool_heads_rejects_a_score_count_that_fits_nothing():
    with pytest.raises(ValueError, match="expected one of"):
        pool_heads(torch.rand(5), out_features=8, head_dim=2, num_query_heads=8)


@settings(max_examples=25)
@given(st.integers(3, 64))
def test_a_single_outlier_is_the_most_protected_unit(n):
    scores = torch.ones(n)
    scores[n // 2] = 100.0
    factors = mask_factors([scores], sharpness=0.5)
    assert int(factors.argmin()) == n // 2


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_invalid_sharpness_raises(bad):
    with pytest.raises(ValueError, match="sharpness"):
        normalize_importance(torch.rand(3), sharpness=bad)
