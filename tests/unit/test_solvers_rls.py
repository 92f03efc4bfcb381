"""RLSState against the float64 one-shot solution: updates, downdates, refusals, persistence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsedit.errors import InvalidRequestError, NumericalError
from rlsedit.solvers import RLSState, solve_oneshot
from rlsedit.solvers.rls import RELATIVE_JITTER

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def relative_error(W: torch.Tensor, W_ref: torch.Tensor, W0: torch.Tensor) -> float:
    """‖W − W_ref‖ / ‖W_ref − W0‖: error relative to the edit itself, not to W0."""
    return float(torch.linalg.matrix_norm(W - W_ref) / torch.linalg.matrix_norm(W_ref - W0))


@st.composite
def streams(draw, weakest_lam: float = 0.0):
    """A random stream: dimensions, regularisation, an anchor (none, full or rank-deficient).

    ``weakest_lam`` replaces ``lam = 0`` with a rank-deficient anchor (whose null space is
    then regularised only by the 1e-6 relative jitter) where a test needs a floor.
    """
    d_k = draw(st.integers(2, 24))
    d_v = draw(st.integers(1, 10))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    lam = draw(st.sampled_from([0.0, 0.3, 1.0, 3.0]))
    mu = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    anchor = draw(st.sampled_from(["none", "full", "deficient"]))
    if lam == 0.0 and (anchor == "none" or mu == 0.0):
        # λ = 0 needs an anchor: make it the hard case, a rank-deficient one
        anchor, mu = "deficient", 1.0
    if lam == 0.0 and anchor == "deficient":
        lam = weakest_lam
    rank = draw(st.integers(1, d_k - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_k, d_v, generator=g, dtype=F64)
    if anchor == "none":
        A = None
    else:
        n_anchor = 2 * d_k + 3 if anchor == "full" else rank
        K0 = torch.randn(d_k, n_anchor, generator=g, dtype=F64)
        A = K0 @ K0.T
    Ks = [torch.randn(d_k, u, generator=g, dtype=F64) for u in sizes]
    Vs = [torch.randn(u, d_v, generator=g, dtype=F64) for u in sizes]
    return dict(W0=W0, A=A, lam=lam, mu=mu, Ks=Ks, Vs=Vs, anchor=anchor)


@SETTINGS
@given(streams())
def test_recursion_equals_oneshot_at_every_step(stream):
    state = RLSState.from_anchor(stream["W0"], stream["A"], stream["lam"], stream["mu"], dtype=F64)
    if stream["lam"] == 0.0 and stream["anchor"] == "deficient":
        assert state.jitter > 0.0, "a rank-deficient anchor with lam = 0 must get the jitter"
    for t, (K, V) in enumerate(zip(stream["Ks"], stream["Vs"]), start=1):
        state.update(K, V)
        W_ref = solve_oneshot(
            stream["W0"], stream["A"], stream["lam"], stream["mu"], stream["Ks"][:t], stream["Vs"][:t],
            jitter=state.jitter,
        )
        assert relative_error(state.W_, W_ref, stream["W0"]) < 1e-6
    assert state.n_keys_ == sum(K.shape[1] for K in stream["Ks"])


@SETTINGS
@given(streams(weakest_lam=0.3), st.data())
def test_downdate_equals_oneshot_without_the_batch(stream, data):
    """Any batch, or one column of it, removed. The anchor's null space gets λ ≥ 0.3 here:
    with only the 1e-6 jitter there, removing the one key that covers it is ill-conditioned
    (see test_ill_conditioned_downdate_warns)."""
    Ks, Vs, W0 = stream["Ks"], stream["Vs"], stream["W0"]
    state = RLSState.from_anchor(W0, stream["A"], stream["lam"], stream["mu"], dtype=F64)
    for K, V in zip(Ks, Vs):
        state.update(K, V)
    index = data.draw(st.integers(0, len(Ks) - 1), label="batch removed")
    single = data.draw(st.booleans(), label="remove one column only")
    keep_K, keep_V = list(Ks), list(Vs)
    if single:
        column = data.draw(st.integers(0, Ks[index].shape[1] - 1), label="column")
        mask = torch.arange(Ks[index].shape[1]) != column
        state.downdate(Ks[index][:, column : column + 1], Vs[index][column : column + 1])
        keep_K[index], keep_V[index] = Ks[index][:, mask], Vs[index][mask]
        removed = 1
    else:
        state.downdate(Ks[index], Vs[index])
        del keep_K[index], keep_V[index]
        removed = Ks[index].shape[1]
    keep = [(K, V) for K, V in zip(keep_K, keep_V) if K.shape[1] > 0]
    W_ref = solve_oneshot(
        W0, stream["A"], stream["lam"], stream["mu"], [K for K, _ in keep], [V for _, V in keep],
        jitter=state.jitter,
    )
    if keep:
        assert relative_error(state.W_, W_ref, W0) < 1e-6
    else:
        # everything removed: back to W0 (the edit is empty, so compare absolutely)
        assert torch.allclose(state.W_, W0, rtol=0, atol=1e-8 * float(W0.abs().max()))
    assert state.n_keys_ == sum(K.shape[1] for K in Ks) - removed


def test_update_then_downdate_restores_C_and_W():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(10, 4, generator=g, dtype=F64)
    state = RLSState.from_anchor(W0, None, 1.0, 0.0, dtype=F64)
    C0 = state.C_.clone()
    K, V = torch.randn(10, 3, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    state.update(K, V).downdate(K, V)
    assert torch.allclose(state.C_, C0, rtol=0, atol=1e-12)
    assert torch.allclose(state.W_, W0, rtol=0, atol=1e-12)
    assert state.n_keys_ == 0 and state.n_updates_ == 2


def test_ill_conditioned_downdate_warns(caplog):
    g = torch.Generator().manual_seed(9)
    W0 = torch.randn(2, 1, generator=g, dtype=F64)
    K0 = torch.randn(2, 1, generator=g, dtype=F64)  # rank 1: the jitter regularises the rest
    K, V = torch.randn(2, 1, generator=g, dtype=F64), torch.randn(1, 1, generator=g, dtype=F64)
    state = RLSState.from_anchor(W0, K0 @ K0.T, 0.0, 1.0, dtype=F64).update(K, V)
    with caplog.at_level("WARNING", logger="rlsedit.solvers.rls"):
        state.downdate(K, V)
    assert "ill-conditioned downdate" in caplog.text


def test_C_is_the_inverse_gram():
    g = torch.Generator().manual_seed(1)
    d_k = 9
    K0 = torch.randn(d_k, 20, generator=g, dtype=F64)
    A = K0 @ K0.T
    state = RLSState.from_anchor(torch.zeros(d_k, 2, dtype=F64), A, 0.5, 0.8, dtype=F64)
    Ks = [torch.randn(d_k, u, generator=g, dtype=F64) for u in (1, 4, 2)]
    for K in Ks:
        state.update(K, torch.zeros(K.shape[1], 2, dtype=F64))
    M = 0.25 * torch.eye(d_k, dtype=F64) + 0.64 * A + sum(K @ K.T for K in Ks)
    assert torch.allclose(state.C_, torch.linalg.inv(M), rtol=1e-10, atol=1e-14)
    assert state.symmetry_error() < 1e-14
    S = torch.eye(2, dtype=F64) + Ks[-1].T @ torch.linalg.inv(M - Ks[-1] @ Ks[-1].T) @ Ks[-1]
    assert math.isclose(state.last_s_condition(), float(torch.linalg.cond(S)), rel_tol=1e-8)
    assert torch.allclose(state.last_S, S, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- singular anchors
def test_singular_anchor_gets_the_documented_jitter():
    g = torch.Generator().manual_seed(2)
    K0 = torch.randn(8, 3, generator=g, dtype=F64)  # rank 3 < d_k = 8
    A = K0 @ K0.T
    state = RLSState.from_anchor(torch.zeros(8, 2, dtype=F64), A, 0.0, 2.0, dtype=F64)
    expected = RELATIVE_JITTER * float(torch.trace(4.0 * A)) / 8
    assert math.isclose(state.jitter, expected, rel_tol=1e-12)
    M = 4.0 * A + expected * torch.eye(8, dtype=F64)
    assert torch.allclose(state.C_ @ M, torch.eye(8, dtype=F64), atol=1e-6)


def test_full_rank_anchor_with_lam_zero_gets_no_jitter():
    g = torch.Generator().manual_seed(3)
    K0 = torch.randn(8, 40, generator=g, dtype=F64)
    state = RLSState.from_anchor(torch.zeros(8, 2, dtype=F64), K0 @ K0.T, 0.0, 1.0, dtype=F64)
    assert state.jitter == 0.0


def test_unregularised_objective_is_refused_unless_jitter_is_given():
    W0 = torch.zeros(5, 2, dtype=F64)
    with pytest.raises(InvalidRequestError, match="unregularised"):
        RLSState.from_anchor(W0, None, 0.0, 1.0)
    with pytest.raises(InvalidRequestError, match="unregularised"):
        RLSState.from_anchor(W0, torch.eye(5, dtype=F64), 0.0, 0.0)
    state = RLSState.from_anchor(W0, None, 0.0, 0.0, jitter=0.5, dtype=F64)
    assert state.jitter == 0.5
    assert torch.allclose(state.C_, 2.0 * torch.eye(5, dtype=F64))


def test_explicit_jitter_that_is_not_enough_is_refused():
    K0 = torch.ones(4, 1, dtype=F64)
    with pytest.raises(NumericalError, match="not positive definite"):
        RLSState.from_anchor(torch.zeros(4, 1, dtype=F64), K0 @ K0.T, 0.0, 1.0, jitter=0.0)


# ---------------------------------------------------------------------- refusals
def _fresh_state() -> tuple[RLSState, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(6, 3, generator=g, dtype=F64)
    state = RLSState.from_anchor(W0, None, 1.0, 0.0, dtype=F64)
    K, V = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)
    state.update(K, V)
    return state, K, V


def _snapshot(state: RLSState):
    return state.C_.clone(), state.W_.clone(), state.n_keys_, state.n_updates_


def _assert_unchanged(state: RLSState, snapshot) -> None:
    C, W, n_keys, n_updates = snapshot
    assert torch.equal(state.C_, C) and torch.equal(state.W_, W)
    assert (state.n_keys_, state.n_updates_) == (n_keys, n_updates)


@pytest.mark.parametrize("where", ["K", "V"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("op", ["update", "downdate"])
def test_non_finite_input_is_refused_and_changes_nothing(where, bad, op):
    state, K, V = _fresh_state()
    K, V = K.clone(), V.clone()
    (K if where == "K" else V)[1, 0] = bad
    before = _snapshot(state)
    with pytest.raises(NumericalError, match="non-finite"):
        getattr(state, op)(K, V)
    _assert_unchanged(state, before)


def test_float32_overflow_of_a_float64_input_is_refused():
    state = RLSState.from_anchor(torch.zeros(4, 2), None, 1.0, 0.0)
    before = _snapshot(state)
    with pytest.raises(NumericalError):
        state.update(torch.full((4, 1), 1e300, dtype=F64), torch.zeros(1, 2))
    _assert_unchanged(state, before)


def test_an_update_that_would_overflow_W_is_refused_and_changes_nothing():
    # two nearly parallel keys with very different targets: W must extrapolate beyond float32
    state = RLSState.from_anchor(torch.zeros(2, 1), None, 1e-3, 0.0)
    state.update(torch.tensor([[1.0], [0.0]]), torch.zeros(1, 1))
    before = _snapshot(state)
    with pytest.raises(NumericalError, match="the new W has"):
        state.update(torch.tensor([[1.0], [1e-3]]), torch.tensor([[1e38]]))
    _assert_unchanged(state, before)
    # an ordinary update afterwards still works
    state.update(torch.tensor([[0.0], [1.0]]), torch.ones(1, 1))
    assert bool(torch.isfinite(state.W_).all())


def test_an_update_with_s_over_one_over_eps_is_refused_and_changes_nothing():
    """λ_max(S) above 1/eps of the state dtype loses C's definiteness to rounding: refused,
    with nothing changed (last_S included); just below the limit it is applied."""
    limit = 1.0 / torch.finfo(F64).eps
    state = RLSState.from_anchor(torch.zeros(3, 2, dtype=F64), None, 1.0, 0.0, dtype=F64)  # C_0 = I
    state.update(torch.eye(3, 1, dtype=F64), torch.ones(1, 2, dtype=F64))
    before, last_S = _snapshot(state), state.last_S.clone()
    # C = I except C_00 = 1/2: S = 1 + 2·limit·C_11 = 1 + 2·limit
    K_far = math.sqrt(2.0 * limit) * torch.eye(3, dtype=F64)[:, 1:2]
    with pytest.raises(NumericalError, match=r"^update: S = I \+ K\^T C K has largest eigenvalue 9\.01e\+15 "
                                             r"\(condition number 1\), over 1/eps of torch\.float64 \(4\.5e\+15\)"):
        state.update(K_far, torch.zeros(1, 2, dtype=F64))
    _assert_unchanged(state, before)
    assert torch.equal(state.last_S, last_S)
    # two keys at 0.6·limit each, orthogonal under C: tr(S) is over the limit, λ_max(S) is not
    K_near = math.sqrt(0.6 * limit) * torch.eye(3, dtype=F64)[:, 1:]
    state.update(K_near, torch.zeros(2, 2, dtype=F64))
    assert state.n_updates_ == before[3] + 1 and float(torch.linalg.eigvalsh(state.last_S)[-1]) < limit


def test_non_pd_downdate_is_refused_and_changes_nothing():
    state, _, _ = _fresh_state()
    before = _snapshot(state)
    # a batch that was never added and is far larger than the state: I − KᵀCK is indefinite
    K_never = 10.0 * torch.ones(6, 1, dtype=F64)
    with pytest.raises(NumericalError, match="not positive definite"):
        state.downdate(K_never, torch.zeros(1, 3, dtype=F64))
    _assert_unchanged(state, before)


def test_downdate_of_more_keys_than_held_is_refused():
    state, K, V = _fresh_state()
    before = _snapshot(state)
    with pytest.raises(InvalidRequestError, match="holds only 2"):
        state.downdate(torch.cat([K, K], dim=1), torch.cat([V, V], dim=0))
    _assert_unchanged(state, before)


@pytest.mark.parametrize(
    "K_shape, V_shape, message",
    [
        ((5, 2), (2, 3), "rows"),  # wrong d_k
        ((6, 2), (3, 3), "rows"),  # u mismatch
        ((6, 2), (2, 4), "columns"),  # wrong d_v
        ((6,), (1, 3), "2-D"),
        ((6, 0), (0, 3), "at least one"),
    ],
)
def test_bad_shapes_are_refused_with_a_clear_error(K_shape, V_shape, message):
    state, _, _ = _fresh_state()
    before = _snapshot(state)
    with pytest.raises(InvalidRequestError, match=message):
        state.update(torch.zeros(K_shape, dtype=F64), torch.zeros(V_shape, dtype=F64))
    _assert_unchanged(state, before)


def test_bad_construction_arguments_are_refused():
    W0 = torch.zeros(4, 2)
    with pytest.raises(InvalidRequestError, match="lam"):
        RLSState.from_anchor(W0, None, -1.0, 0.0)
    with pytest.raises(InvalidRequestError, match="symmetric"):
        RLSState.from_anchor(W0, torch.triu(torch.ones(4, 4)), 1.0, 1.0)
    with pytest.raises(InvalidRequestError, match="rows"):
        RLSState.from_anchor(W0, torch.eye(3), 1.0, 1.0)
    with pytest.raises(InvalidRequestError, match="dtype"):
        RLSState.from_anchor(W0, None, 1.0, 0.0, dtype=torch.float16)
    with pytest.raises(NumericalError):
        RLSState.from_anchor(torch.full((4, 2), float("nan")), None, 1.0, 0.0)


# ---------------------------------------------------------------------- persistence
def test_state_dict_round_trip_is_exact_and_evolves_identically():
    g = torch.Generator().manual_seed(5)
    K0 = torch.randn(7, 4, generator=g)
    state = RLSState.from_anchor(torch.randn(7, 3, generator=g), K0 @ K0.T, 0.0, 1.3, symmetrize_every=3)
    for _ in range(4):
        state.update(torch.randn(7, 2, generator=g), torch.randn(2, 3, generator=g))
    copy = RLSState.from_state_dict(state.state_dict())
    for key in ("C_", "W_", "W0"):
        assert torch.equal(getattr(copy, key), getattr(state, key))
        assert getattr(copy, key).data_ptr() != getattr(state, key).data_ptr()
    for key in ("lam", "mu", "jitter", "n_keys_", "n_updates_", "symmetrize_every"):
        assert getattr(copy, key) == getattr(state, key)
    assert state.jitter > 0.0  # the rank-deficient anchor made the rule fire
    # as strings, the way safetensors metadata stores them
    as_metadata = {k: (v if isinstance(v, torch.Tensor) else repr(v)) for k, v in state.state_dict().items()}
    copy2 = RLSState.from_state_dict(as_metadata)
    assert copy2.jitter == state.jitter and torch.equal(copy2.C_, state.C_)
    K, V = torch.randn(7, 3, generator=g), torch.randn(3, 3, generator=g)
    state.update(K, V)
    copy.update(K, V)
    assert torch.equal(copy.C_, state.C_) and torch.equal(copy.W_, state.W_)


def test_from_state_dict_refuses_bad_input():
    state, _, _ = _fresh_state()
    good = state.state_dict()
    with pytest.raises(InvalidRequestError, match="missing"):
        RLSState.from_state_dict({k: v for k, v in good.items() if k != "jitter"})
    with pytest.raises(InvalidRequestError, match="format_version"):
        RLSState.from_state_dict({**good, "format_version": 99})
    with pytest.raises(InvalidRequestError, match="rows"):
        RLSState.from_state_dict({**good, "W0": torch.zeros(5, 3, dtype=F64)})
    with pytest.raises(NumericalError):
        RLSState.from_state_dict({**good, "C": torch.full_like(good["C"], float("nan"))})


def test_symmetrize_removes_an_injected_asymmetry():
    state = RLSState.from_anchor(torch.zeros(5, 1, dtype=F64), None, 1.0, 0.0, dtype=F64, symmetrize_every=2)
    state.C_[0, 1] += 1e-3
    assert state.symmetry_error() > 1e-5
    state.update(torch.ones(5, 1, dtype=F64), torch.zeros(1, 1, dtype=F64))
    assert state.symmetry_error() > 1e-5  # first call: not yet due
    state.update(torch.ones(5, 1, dtype=F64), torch.zeros(1, 1, dtype=F64))
    assert state.symmetry_error() == 0.0


def test_a_deep_copy_owns_C_and_W_and_shares_the_never_written_W0():
    g = torch.Generator().manual_seed(5)
    K0 = torch.randn(6, 12, generator=g, dtype=F64)
    state = RLSState.from_anchor(torch.randn(6, 3, generator=g, dtype=F64), K0 @ K0.T, 0.0, 1.0, dtype=F64)
    C, W = state.C_.clone(), state.W_.clone()
    twin = copy.deepcopy(state)
    twin.update(torch.randn(6, 2, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64))
    assert torch.equal(state.C_, C) and torch.equal(state.W_, W) and state.last_S is None
    assert not torch.equal(twin.C_, C) and twin.last_S is not None
    assert twin.W0 is state.W0


def test_a_state_rebuilt_from_contiguous_copies_continues_bit_identically():
    # a state file holds row-major tensors; the live C must have that layout too, or the two
    # streams' GEMMs round differently after a reload
    g = torch.Generator().manual_seed(6)
    d_k, d_v = 96, 8
    K0 = torch.randn(d_k, 4 * d_k, generator=g)
    live = RLSState.from_anchor(torch.randn(d_k, d_v, generator=g), K0 @ K0.T / (4 * d_k), 0.0, 1.0,
                                dtype=torch.float32)
    assert live.C_.is_contiguous() and live.W_.is_contiguous()
    live.update(torch.randn(d_k, 5, generator=g), torch.randn(5, d_v, generator=g))
    saved = {k: (v.contiguous().clone() if isinstance(v, torch.Tensor) else v) for k, v in live.state_dict().items()}
    reloaded = RLSState.from_state_dict(saved)
    K, V = torch.randn(d_k, 7, generator=g), torch.randn(7, d_v, generator=g)
    live.update(K, V)
    reloaded.update(K, V)
    assert torch.equal(live.C_, reloaded.C_) and torch.equal(live.W_, reloaded.W_)
