"""MEMIT, MEMIT-seq, AlphaEdit, ROME and the official RLSEdit update, in our orientation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsedit.errors import InvalidRequestError, NumericalError
from rlsedit.solvers import (
    RLSState,
    alphaedit_delta,
    memit_delta,
    memit_seq_solve,
    null_space_projector,
    official_update,
    rome_delta,
    rome_left_vector,
)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def random_problem(seed: int, d_k: int = 10, d_v: int = 4, n_anchor: int | None = None):
    g = torch.Generator().manual_seed(seed)
    K0 = torch.randn(d_k, n_anchor or 3 * d_k, generator=g, dtype=F64)
    return g, torch.randn(d_k, d_v, generator=g, dtype=F64), K0 @ K0.T


# ---------------------------------------------------------------------- MEMIT
def test_memit_delta_solves_its_normal_equations():
    g, _, A = random_problem(0)
    K, R = torch.randn(10, 3, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    delta = memit_delta(A, K, R, mu=1.5)
    assert torch.allclose((2.25 * A + K @ K.T) @ delta, K @ R, atol=1e-10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d_k=st.integers(2, 24),
    d_v=st.integers(1, 10),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    mu=st.sampled_from([0.3, 1.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_memit_seq_equals_rls_with_lam_zero_at_every_batch(d_k, d_v, sizes, mu, seed):
    g = torch.Generator().manual_seed(seed)
    K0 = torch.randn(d_k, 2 * d_k + 3, generator=g, dtype=F64)
    A = K0 @ K0.T
    W0 = torch.randn(d_k, d_v, generator=g, dtype=F64)
    state = RLSState.from_anchor(W0, A, 0.0, mu, dtype=F64, jitter=0.0)
    W_seq, G_past = W0.clone(), None
    for u in sizes:
        K, V = torch.randn(d_k, u, generator=g, dtype=F64), torch.randn(u, d_v, generator=g, dtype=F64)
        W_new = memit_seq_solve(W_seq, A, G_past, K, V, mu=mu)
        state.update(K, V)
        assert float(torch.linalg.matrix_norm(W_new - state.W_) / torch.linalg.matrix_norm(W_new - W0)) < 1e-6
        W_seq = W_new
        G_past = K @ K.T if G_past is None else G_past + K @ K.T


def test_memit_seq_first_batch_is_memit():
    g, W0, A = random_problem(1)
    K, V = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(2, 4, generator=g, dtype=F64)
    expected = W0 + memit_delta(A, K, V - K.T @ W0, mu=0.7)
    assert torch.allclose(memit_seq_solve(W0, A, None, K, V, mu=0.7), expected, atol=1e-12)


def test_memit_refuses_bad_input():
    _, W0, A = random_problem(2)
    with pytest.raises(InvalidRequestError, match="rows"):
        memit_delta(A, torch.ones(9, 1, dtype=F64), torch.ones(1, 4, dtype=F64))
    with pytest.raises(NumericalError, match="non-finite"):
        memit_seq_solve(W0, A, None, torch.full((10, 1), float("nan"), dtype=F64), torch.ones(1, 4, dtype=F64))
    with pytest.raises(NumericalError, match="positive definite"):
        memit_delta(torch.zeros(10, 10, dtype=F64), torch.ones(10, 1, dtype=F64), torch.ones(1, 4, dtype=F64))


# ---------------------------------------------------------------------- official RLSEdit code
def transcribed_official_update(C0, W_prev, K_t, V_t, n_layers, i):
    """Hand transcription of the per-layer update in RLSEdit/RLSEdit_main.py (Euphoria040201)."""
    F_t = C0 @ K_t
    S_t = torch.eye(K_t.size(1), dtype=K_t.dtype) + K_t.T @ F_t
    R_small = torch.linalg.cholesky(S_t, upper=True)
    G_t = torch.linalg.solve_triangular(R_small, F_t, upper=True, left=False)
    C_t = C0 - G_t @ G_t.T
    resid_y = V_t - K_t.T @ W_prev
    resid_y = resid_y / (n_layers - i)
    return W_prev + C_t @ K_t @ resid_y


def test_official_update_matches_the_transcription_and_differs_from_the_exact_recursion():
    g, W0, A = random_problem(3)
    lam, mu = 0.5, 1.0
    exact = RLSState.from_anchor(W0, A, lam, mu, dtype=F64)
    C0 = exact.C_.clone()
    batches = [
        (torch.randn(10, 3, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)) for _ in range(2)
    ]
    W_official = W0.clone()
    for K, R in batches:
        # the exact recursion's absolute target: the current output plus the residual
        exact.update(K, K.T @ exact.W_ + R)
        reference = transcribed_official_update(C0, W_official, K, R, n_layers=3, i=1)
        W_official = official_update(C0, W_official, K, R, layers_left=2)
        assert torch.allclose(W_official, reference, rtol=0, atol=1e-12)
    assert rel(W_official, exact.W_) > 0.05


def test_official_update_with_absolute_targets_differs_only_by_the_reset_of_C():
    g, W0, A = random_problem(4)
    exact = RLSState.from_anchor(W0, A, 0.5, 1.0, dtype=F64)
    C0 = exact.C_.clone()
    (K1, R1), (K2, R2) = [
        (torch.randn(10, 3, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)) for _ in range(2)
    ]
    # giving the official code the absolute target removes difference 2: batch 1 agrees
    V1 = K1.T @ W0 + R1
    W1 = official_update(C0, W0, K1, V1)
    exact.update(K1, V1)
    assert rel(W1, exact.W_) < 1e-12
    # batch 2 starts again from C_0 instead of C_1: it no longer agrees
    V2 = K2.T @ W1 + R2
    W2 = official_update(C0, W1, K2, V2)
    exact.update(K2, V2)
    assert rel(W2, exact.W_) > 1e-3


def test_official_update_refuses_bad_layers_left():
    _, W0, _ = random_problem(5)
    with pytest.raises(InvalidRequestError, match="layers_left"):
        official_update(torch.eye(10, dtype=F64), W0, torch.ones(10, 1, dtype=F64), torch.ones(1, 4, dtype=F64), layers_left=0)


# ---------------------------------------------------------------------- AlphaEdit
def spectrum_moment(seed: int, d_k: int = 12) -> torch.Tensor:
    """E[kkᵀ] with eigenvalues 1e-4 ... 1 (a few below AlphaEdit's 2e-2 threshold)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=F64))
    eigenvalues = torch.logspace(-4, 0, d_k, dtype=F64)
    return Q @ torch.diag(eigenvalues) @ Q.T


def test_null_space_projector_keeps_the_small_eigenvectors():
    E = spectrum_moment(6)
    P = null_space_projector(E, threshold=2e-2)
    eigenvalues, U = torch.linalg.eigh(E)
    small = U[:, eigenvalues < 2e-2]
    assert small.shape[1] == int((torch.logspace(-4, 0, 12, dtype=F64) < 2e-2).sum())
    assert torch.allclose(P, P.T, atol=1e-12) and torch.allclose(P @ P, P, atol=1e-12)
    assert torch.allclose(P @ small, small, atol=1e-12)
    assert float(torch.linalg.matrix_norm(P @ E @ P, ord=2)) < 2e-2
    assert torch.count_nonzero(null_space_projector(E, threshold=0.0)) == 0


def test_alphaedit_delta_matches_upstream_form_and_lies_in_the_null_space():
    g = torch.Generator().manual_seed(7)
    E = spectrum_moment(7)
    P = null_space_projector(E)
    K, R = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    K_past = torch.randn(12, 4, generator=g, dtype=F64)
    G_past = K_past @ K_past.T
    delta = alphaedit_delta(P, K, R, G_past, l2=10.0)
    # upstream: solve(P @ (K Kᵀ + cache_c) + L2·I, P @ K @ residᵀ)
    upstream = torch.linalg.solve(P @ (K @ K.T + G_past) + 10.0 * torch.eye(12, dtype=F64), P @ K @ R)
    assert torch.allclose(delta, upstream, atol=1e-12)
    assert torch.allclose(P @ delta, delta, atol=1e-10)
    # so the preserved keys' outputs do not move: E ΔW is as small as E on the null space
    assert float(torch.linalg.matrix_norm(E @ delta)) < 2e-2 * float(torch.linalg.matrix_norm(delta))


def test_alphaedit_refuses_zero_l2():
    with pytest.raises(InvalidRequestError, match="l2"):
        alphaedit_delta(torch.eye(3, dtype=F64), torch.ones(3, 1, dtype=F64), torch.ones(1, 2, dtype=F64), None, 0.0)


# ---------------------------------------------------------------------- ROME
def test_rome_delta_inserts_the_target_and_is_the_constrained_minimiser():
    g, W, C = random_problem(8)
    k = torch.randn(10, 1, generator=g, dtype=F64)
    v_star = torch.randn(1, 4, generator=g, dtype=F64)
    u = rome_left_vector(C, k)
    assert abs(float(torch.linalg.vector_norm(u)) - 1.0) < 1e-12
    delta = rome_delta(W, k, v_star, u)
    assert torch.allclose((W + delta).T @ k, v_star.T, atol=1e-10)
    # argmin tr(ΔᵀCΔ) s.t. (W + Δ)ᵀk = v*  is  C⁻¹k (v* − Wᵀk)ᵀ / (kᵀC⁻¹k)
    Cinv_k = torch.linalg.solve(C, k)
    expected = Cinv_k @ (v_star - k.T @ W) / float(k.T @ Cinv_k)
    assert torch.allclose(delta, expected, atol=1e-10)
    # the scale of u cancels
    assert torch.allclose(rome_delta(W, k, v_star, 7.0 * u), delta, atol=1e-12)
    assert torch.linalg.matrix_rank(delta) == 1


def test_rome_refuses_an_edit_direction_orthogonal_to_the_key():
    W = torch.zeros(3, 2, dtype=F64)
    k = torch.tensor([[1.0], [0.0], [0.0]], dtype=F64)
    u = torch.tensor([[0.0], [1.0], [0.0]], dtype=F64)
    with pytest.raises(NumericalError, match="negligible"):
        rome_delta(W, k, torch.ones(1, 2, dtype=F64), u)
