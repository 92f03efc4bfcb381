"""The float32 RLS recursion over 10,000 edits on REAL SmolLM2 keys stays close to float64.

Keys are the down-projection inputs of SmolLM2-135M at one edit layer for CounterFact
subjects; the anchor is ``A = n·E[kkᵀ]`` from the small Wikipedia corpus, as a session uses.
The reference is the float64 one-shot solution of the same objective
(:func:`rlsedit.solvers.oneshot.solve_oneshot`), so the bound covers all rounding of the
float32 recursion, not only its difference to a float64 recursion.
"""

from __future__ import annotations

import pytest
import torch

from rlsedit.solvers import RLSState, solve_oneshot

pytestmark = pytest.mark.integration

CF = "../shared/data/counterfact/counterfact-train.json"
CORPUS = "../shared/data/corpus/enwiki_pages_2MB.jsonl"
N_SUBJECTS = 300
N_UPDATES = 10_000
CHECKPOINTS = (2_500, 10_000)
MOM2_TOKENS = 20_000
MOM2_UPDATE_WEIGHT = 15_000.0  # the editors' default n (RLSEditConfig.mom2_update_weight)


@pytest.fixture
def one_thread():
    # 1536² rank-one updates are memory-bound; a second thread only adds hand-offs on 2 cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def real_keys_and_anchor(repo_root, tmp_path):
    from rlsedit.locate.keys import compute_keys
    from rlsedit.locate.stats import second_moments
    from rlsedit.model.load import load_model
    from rlsedit.model.weights import get_W
    from rlsedit.requests import read_requests

    lm = load_model("smollm2")
    layer = lm.default_layers()[0]
    requests = read_requests(repo_root / CF, limit=N_SUBJECTS)
    K_real = compute_keys(lm, layer, requests, ["{}"]).double()  # (d_k, 300)
    moment = second_moments(lm, [layer], repo_root / CORPUS, max_tokens=MOM2_TOKENS, cache_dir=tmp_path)[layer]
    W0 = get_W(lm, layer).double()  # (d_k, d_v)
    return layer, K_real, MOM2_UPDATE_WEIGHT * moment.mom.double(), W0


def test_float32_recursion_over_10000_real_keys_stays_near_float64(repo_root, tmp_path, one_thread):
    """10,000 rank-one updates, λ = 0, μ = 1 (RLSEdit's defaults), SmolLM2-135M layer 3
    (d_k = 1536, d_v = 576). Key ``i`` is real key ``i mod 300`` with a 5% multiplicative
    perturbation per entry (each subject is edited ~33 times, as a long-lived editor sees
    recurring subjects); its target is ``W_0ᵀk`` plus a random residual of 30% of that norm.

    Measured (torch 2.13 CPU/MKL, this seed, no jitter needed): ‖W₃₂ − W₆₄‖_F / ‖W₆₄ − W₀‖_F
    = 2.6e-5 after 2,500 and 6.7e-5 after 10,000 updates (growing about like √t);
    ‖C₃₂ − C₆₄‖_F / ‖C₆₄‖_F = 4.5e-6; C₃₂ stayed bitwise symmetric. Asserted with a 7-10×
    margin: 2e-4 at 2,500, 5e-4 at 10,000, 5e-5 for C, 1e-6 for the symmetry error.
    About 40 s of CPU (one thread), most of it the 10,000 float32 updates.
    """
    layer, K_real, A, W0 = real_keys_and_anchor(repo_root, tmp_path)
    d_k, d_v = W0.shape
    g = torch.Generator().manual_seed(20260124)
    base = K_real[:, torch.arange(N_UPDATES) % K_real.shape[1]]  # (d_k, N)
    K_all = base * (1.0 + 0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64))  # (d_k, N)
    clean = K_all.T @ W0  # (N, d_v): the unedited outputs
    noise = torch.randn(clean.shape, generator=g, dtype=torch.float64)
    V_all = clean + 0.3 * noise * (clean.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True))

    state32 = RLSState.from_anchor(W0.float(), A, 0.0, 1.0, dtype=torch.float32)
    K32, V32 = K_all.float(), V_all.float()
    errors_W = {}
    for i in range(N_UPDATES):
        state32.update(K32[:, i:i + 1], V32[i:i + 1])
        t = i + 1
        if t in CHECKPOINTS:
            W64 = solve_oneshot(W0, A, 0.0, 1.0, [K_all[:, :t]], [V_all[:t]], jitter=state32.jitter)
            errors_W[t] = float(torch.linalg.matrix_norm(state32.W_.double() - W64)
                                / torch.linalg.matrix_norm(W64 - W0))
    # C₆₄ = (λ²I + μ²A + ΣKKᵀ)⁻¹ in float64
    M = A.clone()
    M.diagonal().add_(state32.jitter)
    M.addmm_(K_all, K_all.T)
    C64 = torch.cholesky_inverse(torch.linalg.cholesky(M))
    error_C = float(torch.linalg.matrix_norm(state32.C_.double() - C64) / torch.linalg.matrix_norm(C64))
    report = f"layer {layer}, jitter {state32.jitter:.3g}: W errors {errors_W}, C error {error_C:.3g}"
    assert (d_k, d_v) == (1536, 576), report
    assert state32.n_keys_ == N_UPDATES
    assert errors_W[2_500] < 2e-4, report
    assert errors_W[10_000] < 5e-4, report
    assert error_C < 5e-5, report
    assert state32.symmetry_error() < 1e-6, report
