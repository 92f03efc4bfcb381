"""Fast value targets (locate/fasttargets.py) on tiny random models: the one-step target is a
hand-computed normalised gradient step, the line search's stacked rows give the losses of
separate passes, verify-then-refine never ends worse than its cheap start, and the default
method is the Adam loop unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import FAMILIES, make_lm, requests
from rlsedit.editors.config import RLSEditConfig
from rlsedit.locate import fasttargets
from rlsedit.locate.fasttargets import compute_fast_targets, compute_value_targets
from rlsedit.locate.targets import (TargetConfig, _adam, _build_problem, _groups, _initial_states, _prepare,
                                    compute_targets, hidden_at_subject)
from rlsedit.model.hooks import edit_output
from rlsedit.model.weights import block

PREFIXES = ["{}", "The city is far away. {}", "Because I said so. {}"]
LAYER = 2
REL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return make_lm(request.param)


def _hand(lm, request, prefixes, layer, at: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """``(N(δ), ∇N(δ))`` of the mean target NLL N(δ) = (1/P) Σ_p (1/T) Σ_t −log P(y_t | p(x) ⊕ y_<t;
    h_s += δ) at ``at`` (default 0): each prompt alone through the whole model, δ added by a hook
    at the subject's last token, full logits."""
    delta = (torch.zeros(lm.d_model) if at is None else at.detach().clone()).float().requires_grad_(True)
    target = lm.tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    total = 0.0
    for prefix in prefixes:
        text = prefix.replace("{}", request.prompt.replace("{}", request.subject))
        end = text.index(request.subject) + len(request.subject)
        subj = len(lm.tokenizer(text[:end])["input_ids"]) - 1
        prompt = lm.tokenizer(text)["input_ids"]
        ids = torch.tensor([prompt + target[:-1]])

        def add(out, subj=subj):
            shift = torch.zeros_like(out)
            shift[0, subj] = 1.0
            return out + shift * delta

        with edit_output(block(lm, layer), add):
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
        first = len(prompt) - 1
        nll = -torch.stack([logp[first + t, y] for t, y in enumerate(target)]).mean()
        total = total + nll / len(prefixes)
    total.backward()
    return float(total.detach()), delta.grad


def _between(values: list[float]) -> float:
    """A bar halfway between the two middle distinct values (far from every value)."""
    distinct = sorted(set(values))
    k = len(distinct) // 2
    return (distinct[k - 1] + distinct[k]) / 2


def test_onestep_is_a_hand_computed_normalised_gradient_step(lm):
    # one candidate δ_i = −s·‖h_i‖·g_i/‖g_i‖ and, per request, a bar between N(0) and N(δ_i)
    # that only the step clears: the result is that step exactly
    h = hidden_at_subject(lm, LAYER, requests())
    for i, request in enumerate(requests()):
        nll0, g = _hand(lm, request, PREFIXES, LAYER)
        assert g.norm() > 0
        expected = -0.3 * h[i].norm() * g / g.norm()
        nll1, _ = _hand(lm, request, PREFIXES, LAYER, expected)
        assert nll1 < nll0 - 1e-3   # a descent step
        config = TargetConfig(method="onestep", step_sizes=(0.3,), accept_nll=(nll0 + nll1) / 2)
        result = compute_fast_targets(lm, LAYER, [request], PREFIXES, config)
        torch.testing.assert_close(result.initial[0], h[i], rtol=1e-5, atol=1e-6)
        assert result.steps.tolist() == [0]
        err = ((result.delta[0] - expected).norm() / expected.norm()).item()
        assert err < REL, f"request {i}: relative difference {err:.2e}"


def test_step_sizes_are_capped_at_the_clamp_ball(lm):
    config = TargetConfig(method="onestep", step_sizes=(5.0,), accept_nll=1e-9, clamp_norm_factor=0.5)
    capped = compute_fast_targets(lm, LAYER, requests(), PREFIXES, config)
    at_cap = compute_fast_targets(lm, LAYER, requests(), PREFIXES, replace(config, step_sizes=(0.5,)))
    assert torch.equal(capped.z, at_cap.z) and (capped.delta.norm(dim=1) > 0).any()


def test_line_search_takes_the_smallest_step_under_the_bar(lm):
    sizes = (0.25, 0.5, 1.0, 2.0, 4.0)
    h = hidden_at_subject(lm, LAYER, requests())
    # a bar δ = 0 already clears: nothing moves
    loose = TargetConfig(method="onestep", step_sizes=sizes, clamp_norm_factor=4.0, accept_nll=1e6)
    assert torch.equal(compute_fast_targets(lm, LAYER, requests(), PREFIXES, loose).delta, torch.zeros_like(h))
    for i, request in enumerate(requests()):
        nll0, g = _hand(lm, request, PREFIXES, LAYER)
        steps = [0.0, *sizes]
        nll = [nll0] + [_hand(lm, request, PREFIXES, LAYER, -s * h[i].norm() * g / g.norm())[0] for s in sizes]
        bar = _between(nll)
        expected = next(s for s, v in zip(steps, nll) if v < bar)
        result = compute_fast_targets(lm, LAYER, [request], PREFIXES, replace(loose, accept_nll=bar))
        ratio = (result.delta[0].norm() / h[i].norm()).item()
        assert ratio == pytest.approx(expected, rel=1e-5, abs=1e-7), (i, nll, bar)
    # a bar no step clears: each request takes the step (or δ = 0) of least loss
    strict = replace(loose, accept_nll=1e-9)
    best = compute_fast_targets(lm, LAYER, requests(), PREFIXES, strict)
    losses = [compute_fast_targets(lm, LAYER, requests(), PREFIXES, replace(strict, step_sizes=(s,))).losses
              for s in sizes]
    for i in range(3):
        assert float(best.losses[i]) == pytest.approx(min(float(v[i]) for v in losses), rel=1e-4, abs=1e-5)


def test_stacked_candidates_equal_separate_passes(lm, monkeypatch):
    config = TargetConfig(method="onestep", step_sizes=(0.25, 0.5, 1.0, 2.0), clamp_norm_factor=4.0, accept_nll=1e-9)
    stacked = compute_fast_targets(lm, LAYER, requests(), PREFIXES, config)
    monkeypatch.setattr(fasttargets, "CANDIDATE_ROWS", 1)   # one candidate per forward
    separate = compute_fast_targets(lm, LAYER, requests(), PREFIXES, config)
    torch.testing.assert_close(stacked.z, separate.z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.losses, separate.losses, rtol=1e-4, atol=1e-5)
    # groups of a few rows (two groups, so more than one candidate per pass and group) agree too
    small = compute_fast_targets(lm, LAYER, requests(), PREFIXES, config, batch_size=3)
    torch.testing.assert_close(small.losses, separate.losses, rtol=1e-4, atol=1e-5)


def _prepared_with_reference(lm, config):
    """The loop's prepared rows, with every group's KL reference taken at δ = 0."""
    layer, reqs, prefixes, config = _prepare(lm, LAYER, requests(), PREFIXES, config, 32)
    problem = _build_problem(lm, reqs, prefixes, config)
    groups = _groups(lm, layer, problem, 32)
    initial = _initial_states(lm, layer, reqs, problem, groups)
    _adam(lm, layer, reqs, problem, replace(config, steps=1), groups, initial)   # one evaluation at δ = 0
    return groups, problem, initial, reqs


def test_verify_never_returns_a_target_worse_than_its_cheap_start(lm):
    # an Adam step far too large: the refinement overshoots, and must keep the cheap δ where
    # no step of it was better
    config = TargetConfig(method="verify", step_sizes=(0.25, 0.5), clamp_norm_factor=4.0, accept_nll=1e-9,
                          early_stop_nll=0.0, lr=50.0, steps=4)
    cheap = compute_fast_targets(lm, LAYER, requests(), PREFIXES, replace(config, method="onestep"))
    verified = compute_fast_targets(lm, LAYER, requests(), PREFIXES, config)
    assert (verified.steps == 3).all()           # every request fell short of the bar and was refined
    assert (verified.losses <= cheap.losses + 1e-5).all()
    # without keeping the best, the same loop from the same start ends worse for some request:
    # the guard is what the assertion above tests
    groups, problem, initial, reqs = _prepared_with_reference(lm, config)
    last = _adam(lm, LAYER, reqs, problem, replace(config, early_stop_nll=1e-9, early_stop_loss=0.0), groups,
                 initial, start=cheap.delta, active=torch.ones(3, dtype=torch.bool))
    assert (last.losses > cheap.losses + 1e-4).any()
    kept = verified.losses >= cheap.losses - 1e-5   # no step improved: the cheap δ itself
    torch.testing.assert_close(verified.z[kept], cheap.z[kept], rtol=0, atol=1e-5)


def test_verify_refines_only_the_requests_short_of_the_bar(lm):
    base = TargetConfig(method="verify", step_sizes=(0.25, 0.5, 1.0, 2.0), clamp_norm_factor=4.0, steps=3, lr=0.05,
                        early_stop_nll=0.0)
    for bar, refined_expected in ((1e6, False), (1e-9, True), (2.0, None)):
        config = replace(base, accept_nll=bar)
        onestep = compute_fast_targets(lm, LAYER, requests(), PREFIXES, replace(config, method="onestep"))
        verified = compute_fast_targets(lm, LAYER, requests(), PREFIXES, config)
        refined = verified.steps > 0
        if refined_expected is not None:
            assert bool(refined.all()) is refined_expected and bool(refined.any()) is refined_expected
        # requests the line search settled keep its δ bit for bit; refined ones end no worse
        assert torch.equal(verified.z[~refined], onestep.z[~refined])
        assert (verified.losses <= onestep.losses + 1e-5).all()


def test_adam_method_is_the_loop_unchanged(lm):
    config = TargetConfig(lr=0.5, steps=5, early_stop_loss=0.0, early_stop_nll=0.0, clamp_norm_factor=4.0)
    a = compute_targets(lm, LAYER, requests(), PREFIXES, config)
    b = compute_value_targets(lm, LAYER, requests(), PREFIXES, config)
    assert torch.equal(a.z, b.z) and torch.equal(a.losses, b.losses) and torch.equal(a.steps, b.steps)


def test_the_line_search_lowers_the_loss(lm):
    # the chosen step lowers every request's objective below its value at δ ≈ 0
    config = TargetConfig(method="onestep", step_sizes=(0.25, 0.5, 1.0, 2.0), clamp_norm_factor=4.0, accept_nll=1e-9)
    result = compute_fast_targets(lm, LAYER, requests(), PREFIXES, config)
    none = compute_fast_targets(lm, LAYER, requests(), PREFIXES, replace(config, step_sizes=(1e-12,)))
    assert (result.losses < none.losses - 1e-3).all()


@pytest.mark.parametrize("changes, needle", [
    ({"method": "sgd"}, "method"), ({"step_sizes": ()}, "step_sizes"), ({"step_sizes": (0.1, -1.0)}, "step_sizes"),
    ({"accept_nll": 0.0}, "accept_nll"), ({"accept_nll": float("nan")}, "accept_nll"),
])
def test_bad_fast_settings_are_refused(changes, needle):
    with pytest.raises(ValueError, match=needle):
        TargetConfig(**changes)


def test_edit_config_carries_the_target_method():
    assert RLSEditConfig().v_method == "adam"
    assert RLSEditConfig.from_dict({"v_method": "verify", "v_accept_nll": 0.5}).v_accept_nll == 0.5
    with pytest.raises(ValueError, match="v_method"):
        RLSEditConfig(v_method="fast")
    with pytest.raises(ValueError, match="v_accept_nll"):
        RLSEditConfig(v_accept_nll=0.0)
