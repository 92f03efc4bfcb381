"""AlphaEdit's null space relative to the layer's spectrum (issue 23, point 1): the corpus keys'
energy inside P's range is bounded, reported per layer, and the official absolute rule stays."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import make_lm
from rlsedit.editors import AlphaEdit
from rlsedit.editors.config import AlphaEditConfig
from rlsedit.errors import InvalidRequestError
from rlsedit.requests import EditRequest
from rlsedit.solvers.alphaedit import null_space_energy, null_space_projector

F64 = torch.float64


def moment_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=F64))
    return Q @ torch.diag(eigenvalues) @ Q.T


def test_the_relative_null_space_holds_at_most_its_share_of_the_corpus_key_energy():
    # a spectrum like SmolLM2's: much of it of the order of the official 2e-2
    s = torch.cat([torch.linspace(1e-3, 3e-2, 25, dtype=F64), torch.linspace(0.05, 0.2, 15, dtype=F64)])
    E = moment_with_spectrum(s)
    g = torch.Generator().manual_seed(1)
    K0 = torch.linalg.cholesky(E) @ torch.randn(40, 200_000, generator=g, dtype=F64)  # E[k kᵀ] ≈ E
    absolute = null_space_projector(E, threshold=2e-2)
    relative = null_space_projector(E)  # default energy 1e-2
    share = lambda P: float((P @ K0).square().sum() / K0.square().sum())  # ‖P K₀‖² / ‖K₀‖²
    # the absolute threshold cuts through the spectrum: far more than 1 % of the energy stays
    assert null_space_energy(E, absolute) > 0.05 and share(absolute) > 0.05
    # the relative rule: ‖P K₀‖²/‖K₀‖² = tr(PEP)/tr(E) ≤ 1 %, with the most small eigenvectors that allows
    m = int(round(float(torch.trace(relative))))
    assert m > 0 and null_space_energy(E, relative) <= 1e-2
    assert null_space_energy(E, relative) == pytest.approx(float(s[:m].sum() / s.sum()), rel=1e-9)
    assert float(s[:m + 1].sum() / s.sum()) > 1e-2  # one more eigenvector would exceed the bound
    assert share(relative) == pytest.approx(null_space_energy(E, relative), rel=0.02)
    assert torch.allclose(relative @ relative, relative, atol=1e-12)
    # energy 0 keeps only exactly-zero eigenvalues; an energy of 1 or more is refused
    assert torch.count_nonzero(null_space_projector(E, energy=0.0)) == 0
    with pytest.raises(InvalidRequestError, match="energy"):
        null_space_projector(E, energy=1.0)


def test_alphaedit_reports_rank_and_energy_per_layer_and_reads_official_thresholds_as_absolute():
    lm = make_lm("llama")
    s = torch.logspace(-4, 0, lm.d_k, dtype=F64)
    moments = {l: moment_with_spectrum(s, seed=l) for l in range(lm.n_layers)}
    editor = AlphaEdit(lm, AlphaEditConfig(layers=(1, 2), context_count=1), moments=moments)
    d = editor.diagnostics()
    expected_rank = int((torch.cumsum(s, 0) <= 1e-2 * s.sum()).sum())
    for l in ("1", "2"):
        assert d[l]["nullspace_rank"] == expected_rank > 0
        assert 0 < d[l]["nullspace_energy"] <= 1e-2
    # an official hparams file's threshold keeps its absolute meaning
    official = AlphaEditConfig.from_dict({"layers": [1, 2], "nullspace_threshold": 2e-2, "L2": 10,
                                          "context_count": 1})
    d = AlphaEdit(lm, official, moments=moments).diagnostics()
    assert d["1"]["nullspace_rank"] == int((s < 2e-2).sum())
    assert d["1"]["nullspace_energy"] == pytest.approx(float(s[s < 2e-2].sum() / s.sum()), rel=1e-6)
    # a batch leaves the figures in place (they are E's, not the stream's)
    editor.partial_fit([EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")])
    assert editor.diagnostics()["2"]["nullspace_rank"] == expected_rank
    with pytest.raises(ValueError, match="nullspace_energy"):
        AlphaEditConfig(nullspace_energy=1.5)
