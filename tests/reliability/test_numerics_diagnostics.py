"""``rlsedit status`` reports, per edited layer, the conditioning of the last ``S`` and the
symmetry error of ``C``, also after the state was reopened from its snapshot.

The expected values are computed independently: ``S = I + KᵀC_prev K`` from the batch's keys
as journaled and the state's ``C`` before it, and ``‖C − Cᵀ‖_F / ‖C‖_F`` from the snapshot.
(Before the fix, a reopened state reported ``S_condition_last: null``: the solver state rebuilt
from a snapshot keeps no ``S``, and closing a session always writes a snapshot.)
"""

from __future__ import annotations

import math

import pytest
import torch
from session_tiny import build_world, cli, cli_status, edit_records, make_state, one_thread, tiny_runtime

from rlsedit.requests import parse_request
from rlsedit.session.session import Session
from rlsedit.session.store import StateStore

__all__ = ["one_thread"]  # autouse fixture, imported for its effect


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("diagnostics") / "world")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_status_reports_s_conditioning_and_c_symmetry_after_reopening(world, tmp_path, batch_size):
    state = tmp_path / "state"
    make_state(world, state, edit_records(4), journal_only=0)
    last = [parse_request(r, i) for i, r in enumerate(edit_records(batch_size, start=50))]
    with Session.open(state, runtime=tiny_runtime(world)) as session:
        C_before = {l: s.C_.double().clone() for l, s in session.editor.states_.items()}  # (d_k, d_k)
        session.edit(last, batch_size=batch_size)
        seq = session.store.journal_count - 1
    with StateStore.open(state) as store:
        entry = store.read_entry(seq)
        snapshot, _, _ = store.read_snapshot()

    status = cli_status(world, state)  # a fresh session: the solver states come from the snapshot
    diagnostics = status["layer_diagnostics"]
    assert sorted(diagnostics) == ["1", "2"]
    for layer in (1, 2):
        d = diagnostics[str(layer)]
        K = entry.tensors[f"layers.{layer}.K"].double()  # (d_k, u)
        S = torch.eye(batch_size, dtype=torch.float64) + K.T @ C_before[layer] @ K  # (u, u)
        eigenvalues = torch.linalg.eigvalsh(S)
        assert math.isclose(d["S_eig_max_last"], float(eigenvalues[-1]), rel_tol=1e-4), (d, eigenvalues)
        assert math.isclose(d["S_eig_min_last"], float(eigenvalues[0]), rel_tol=1e-4), (d, eigenvalues)
        assert math.isclose(d["S_condition_last"], float(eigenvalues[-1] / eigenvalues[0]), rel_tol=1e-4)
        if batch_size == 1:
            assert d["S_condition_last"] == 1.0  # a 1×1 S: λ_max(S) = 1 + kᵀCk is the telling number
        C = snapshot[f"layers.{layer}.rls.C"].double()
        expected = float(torch.linalg.matrix_norm(C - C.T) / torch.linalg.matrix_norm(C))
        assert d["C_symmetry_error"] == pytest.approx(expected, abs=1e-12)
        assert 0.0 <= d["C_symmetry_error"] < 1e-6


def test_status_after_undo_reports_the_downdate(world, tmp_path):
    """An undo's ``S = I − kᵀCk`` lies in (0, 1]: status shows the downdate, not the last edit."""
    state = tmp_path / "state"
    make_state(world, state, edit_records(4), journal_only=0)
    code, _, err = cli(["undo", "--state", str(state), "--edit", "e1", "--cache-dir", str(world.cache)])
    assert code == 0, err
    for layer, d in cli_status(world, state)["layer_diagnostics"].items():
        assert 0.0 < d["S_eig_min_last"] <= d["S_eig_max_last"] <= 1.0, (layer, d)
