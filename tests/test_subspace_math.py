"""Property tests of the pure input-subspace math (peft_cofi.subspace_math)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peft_cofi.subspace_math import (
    Projection,
    check_basis,
    check_energy,
    contrastive_directions,
    kept_energy,
    projector,
    rank_for_energy,
    top_directions,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def bases(draw, min_n: int = 2, max_n: int = 24) -> torch.Tensor:
    """A random orthonormal ``n x k`` basis, ``1 <= k < n`` (both the thin and the complement storage occur)."""
    n = draw(st.integers(min_n, max_n))
    k = draw(st.integers(1, n - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q
    return q[:, :k].float().contiguous()


def rotation(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


def delta_for(basis: torch.Tensor, rows: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, basis.shape[0], generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(bases(), st.integers(1, 6))
def test_projection_is_idempotent_zero_on_the_span_and_identity_off_it(basis, rows):
    projection, delta = Projection.of(basis), delta_for(basis, rows)
    assert projection.keep == (2 * basis.shape[1] > basis.shape[0]) and projection.rank == basis.shape[1]
    projected = projection(delta)
    torch.testing.assert_close(projection(projected), projected, atol=1e-5, rtol=1e-5)
    # exactly zero on span(U) (to float tolerance), for every input in it
    assert projected.matmul(basis).abs().max() < 1e-5
    # unchanged on the orthogonal complement
    outside = projector(basis.double()).float() @ torch.randn(basis.shape[0], 3, generator=torch.Generator())
    torch.testing.assert_close(projected @ outside, delta @ outside, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(bases())
def test_thin_and_complement_storage_are_the_dense_projector(basis):
    delta = delta_for(basis, seed=1)
    dense = delta.double() @ projector(basis.double())
    for projection in (Projection(basis, False), Projection.of(basis)):
        torch.testing.assert_close(projection(delta).double(), dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(projection(delta, fused=False).double(), dense, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(bases())
def test_gradient_through_the_projection_is_projected_too(basis):
    delta = delta_for(basis, seed=2).requires_grad_(True)
    upstream = torch.randn(delta.shape, generator=torch.Generator().manual_seed(3))
    (Projection.of(basis)(delta) * upstream).sum().backward()
    assert delta.grad.matmul(basis).abs().max() < 1e-5  # the optimizer never sees the protected directions


@SETTINGS
@given(
    st.lists(st.floats(1e-3, 10.0), min_size=2, max_size=16, unique=True),
    st.floats(0.05, 0.99),
    st.integers(0, 2**31 - 1),
)
def test_energy_picks_the_fewest_top_directions_that_hold_it(values, energy, seed):
    spectrum = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    q = rotation(len(values), seed)
    c = q @ torch.diag(spectrum) @ q.T
    shares = (spectrum.cumsum(0) / spectrum.sum()).tolist()
    expected = next(j + 1 for j, share in enumerate(shares) if share >= energy - 1e-9)
    if expected == len(values):
        with pytest.raises(ValueError, match="leaves nothing to train"):
            top_directions(c, energy)
        return
    chosen = top_directions(c, energy)
    assert chosen.k == expected
    # the top span is defined only where the spectrum has a gap at the cut (equal eigenvalues there: any mix is right)
    assume(spectrum[expected - 1] - spectrum[expected] > 1e-6 * spectrum[0])
    # the span is the top eigenvectors' (up to sign and rotation within it), and holds the energy it reports
    top = q[:, :expected]
    inside = (top.T @ chosen.basis.double()).norm(dim=0)  # each chosen direction lies in the top span
    torch.testing.assert_close(inside, torch.ones_like(inside), atol=1e-4, rtol=0)
    assert math.isclose(kept_energy(c, chosen.basis), chosen.energy, abs_tol=1e-5)
    assert chosen.energy >= energy - 1e-6 and (expected == 1 or shares[expected - 2] < energy)
    check_basis(chosen.basis)


@SETTINGS
@given(st.integers(3, 16), st.integers(1, 2**31 - 1), st.data())
def test_rank_picks_exactly_that_many_orthonormal_directions(n, seed, data):
    rank = data.draw(st.integers(1, n - 1))
    x = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for chosen in (top_directions(x.T @ x, rank=rank), contrastive_directions(x.T @ x, torch.eye(n), rank=rank)):
        assert chosen.k == rank
        check_basis(chosen.basis, n)
        assert (chosen.curve.diff() >= -1e-6).all() and abs(float(chosen.curve[-1]) - 1) < 1e-5


@SETTINGS
@given(
    st.lists(st.sampled_from([0.2, 0.3, 0.5, 3.0, 5.0, 8.0]), min_size=3, max_size=12),
    st.lists(st.floats(0.5, 2.0), min_size=12, max_size=12),
    st.integers(0, 2**31 - 1),
    st.floats(0.1, 1.0),
)
def test_contrastive_basis_keeps_task_heavy_directions_out(ratios, scale, seed, energy):
    """Shared eigenvectors: general energy g_i, task energy t_i = g_i / ratio_i. Directions the task uses more (after
    both are scaled to unit trace) must stay trainable, whatever the energy."""
    n = len(ratios)
    g = torch.tensor(scale[:n], dtype=torch.float64)
    t = g / torch.tensor(ratios, dtype=torch.float64)
    normalised = (g / g.sum()) / (t / t.sum())
    task_heavy, general_heavy = normalised < 0.9, normalised > 1.1
    if not task_heavy.any() or not general_heavy.any():
        return  # the mix leaves no direction clearly on one side
    q = rotation(n, seed)
    chosen = contrastive_directions(q @ torch.diag(g) @ q.T, q @ torch.diag(t) @ q.T, energy=energy)
    assert chosen.basis.double().T.matmul(q[:, task_heavy]).abs().max() < 1e-3
    # with all the energy asked for, it protects every general-heavy direction and still no task-heavy one
    full = contrastive_directions(q @ torch.diag(g) @ q.T, q @ torch.diag(t) @ q.T, energy=1.0)
    inside = (full.basis.double().T @ q[:, general_heavy]).norm(dim=0)
    torch.testing.assert_close(inside, torch.ones_like(inside), atol=1e-3, rtol=0)
    assert full.basis.double().T.matmul(q[:, task_heavy]).abs().max() < 1e-3


def test_plain_basis_would_protect_the_task_heavy_direction_the_contrastive_one_leaves():
    general = torch.diag(torch.tensor([5.0, 4.0, 0.5, 0.1], dtype=torch.float64))
    task = torch.diag(torch.tensor([0.2, 8.0, 1.0, 1.0], dtype=torch.float64))
    plain, contrast = top_directions(general, energy=0.9), contrastive_directions(general, task, energy=0.9)
    assert plain.basis[1].abs().max() > 0.99  # direction 1: heavy in both; plain protects it
    assert contrast.basis[1].abs().max() < 1e-6 and contrast.basis[0].abs().max() > 0.99


def test_energy_one_keeps_exactly_the_directions_with_energy():
    x = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # rank 3 inputs
    chosen = top_directions(x.T @ x, energy=1.0)
    assert chosen.k == 3
    assert (x.float() - x.float() @ chosen.basis @ chosen.basis.T).abs().max() < 1e-5


@pytest.mark.parametrize("energy", [0, -0.1, 1.5, math.nan, math.inf, True, "0.9"])
def test_energy_outside_the_unit_interval_is_refused(energy):
    with pytest.raises(ValueError, match=r"energy=.* must be a fraction in \(0, 1\]"):
        check_energy(energy)
    with pytest.raises(ValueError, match="energy="):
        rank_for_energy(torch.tensor([0.5, 1.0]), energy)


@pytest.mark.parametrize(
    ("basis", "message"),
    [
        (torch.eye(4)[:, :0], "rank 0"),
        (torch.eye(4), "rank 4 of 4"),
        (torch.ones(4, 2), "not orthonormal"),
        (torch.full((4, 1), math.nan), "NaN or inf"),
        (torch.ones(4), "2-D"),
        (torch.eye(4, dtype=torch.long)[:, :1], "float tensor"),
    ],
)
def test_bad_bases_are_refused(basis, message):
    with pytest.raises(ValueError, match=message):
        check_basis(basis)


def test_a_basis_of_another_width_is_refused():
    with pytest.raises(ValueError, match="has 4 rows but the module has 6 input features"):
        check_basis(torch.eye(4)[:, :1], in_features=6)


def test_bad_second_moments_are_refused():
    with pytest.raises(ValueError, match="zero energy"):
        top_directions(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        top_directions(torch.full((3, 3), math.nan))
    with pytest.raises(ValueError, match="differ in shape"):
        contrastive_directions(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="rank=3 protects 3 of 3"):
        top_directions(torch.eye(3), rank=3)
