"""Targets: batched optimisation == per-request reference; hidden states; config checks.

Tolerance for batched vs reference: the two paths run the same float32 math in a different
order (blocks replayed from a cached prefix vs the whole model with a hook; padding to
different lengths; gradients accumulated over groups). Adam divides by the gradient's running
RMS, so a coordinate whose gradient is near Adam's ε (1e-8) takes a rounding-sensitive step;
the comparison is therefore per request on the whole vector:
``‖z_batched − z_reference‖ / ‖z_reference‖ < 1e-4``; observed 1e-7 to 1e-6 on all three
families. Step counts must agree exactly.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import FAMILIES, make_lm, requests
from rlsedit.errors import InvalidRequestError, NumericalError
from rlsedit.locate.targets import TargetConfig, compute_targets, hidden_at_subject
from rlsedit.locate.targets_reference import compute_targets_reference
from rlsedit.model.hooks import capture
from rlsedit.model.weights import block, weights_sha256
from rlsedit.requests import EditRequest

PREFIXES = ["{}", "The city is far away. {}", "Because I said so. {}"]
LAYER = 2
# A small random model cannot reach MEMIT's loss threshold; a wide clamp lets δ move.
NO_STOP = TargetConfig(lr=0.5, steps=10, early_stop_loss=0.0, early_stop_nll=0.0, clamp_norm_factor=4.0)
TOL = dict(rtol=1e-4, atol=1e-4)  # for losses and probabilities
REL = 1e-4                         # for z, per request (see module docstring)


def assert_rows_close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> None:
    err = ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()
    assert err < rel, f"max relative row difference {err:.2e} >= {rel:.0e}"


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return make_lm(request.param)


def test_hidden_at_subject_is_block_output(lm):
    H = hidden_at_subject(lm, LAYER, requests())
    assert H.shape == (3, lm.d_model) and H.dtype == torch.float32
    for i, r in enumerate(requests()):
        ids = lm.tokenizer(r.text, return_tensors="pt")["input_ids"]
        end = r.prompt.index("{}") + len(r.subject)
        pos = len(lm.tokenizer(r.text[:end])["input_ids"]) - 1
        with torch.no_grad(), capture(block(lm, LAYER), inputs=False) as seen:
            lm.model(input_ids=ids)
        torch.testing.assert_close(H[i], seen[0][0, pos], rtol=1e-5, atol=1e-6)


def test_batched_equals_reference_without_early_stop(lm):
    batched = compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP)
    reference = compute_targets_reference(lm, LAYER, requests(), PREFIXES, NO_STOP)
    assert batched.steps.tolist() == reference.steps.tolist() == [NO_STOP.steps - 1] * 3
    torch.testing.assert_close(batched.initial, reference.initial, rtol=1e-5, atol=1e-6)
    assert_rows_close(batched.z, reference.z)
    torch.testing.assert_close(batched.losses, reference.losses, **TOL)
    torch.testing.assert_close(batched.target_prob, reference.target_prob, **TOL)
    assert (batched.delta.norm(dim=1) > 0).all()


def test_batched_equals_reference_with_early_stop_at_different_steps(lm):
    # Pick the threshold from an uninterrupted run so two requests stop early and one never.
    free = compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP)
    low, mid, high = sorted(free.losses.tolist())
    config = TargetConfig(lr=0.5, steps=10, early_stop_loss=(mid + high) / 2, early_stop_nll=0.0,
                          clamp_norm_factor=4.0)
    batched = compute_targets(lm, LAYER, requests(), PREFIXES, config)
    reference = compute_targets_reference(lm, LAYER, requests(), PREFIXES, config)
    assert batched.steps.tolist() == reference.steps.tolist()
    assert max(batched.steps.tolist()) == config.steps - 1 and min(batched.steps.tolist()) < config.steps - 1
    assert_rows_close(batched.z, reference.z)
    stopped = batched.steps < config.steps - 1
    assert (batched.losses[stopped] < config.early_stop_loss).all()


def test_groups_do_not_change_the_result(lm):
    # batch_size=2 splits the 12 rows into length groups and drops stopped requests' rows
    whole = compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP, batch_size=64)
    split = compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP, batch_size=2)
    assert_rows_close(whole.z, split.z)


def test_rows_are_split_evenly_over_the_fewest_groups(lm):
    from rlsedit.locate.targets import _build_problem, _groups, _prepare

    layer, reqs, prefixes, config = _prepare(lm, LAYER, requests(), PREFIXES, NO_STOP, 5)
    problem = _build_problem(lm, reqs, prefixes, config)
    rows = len(problem.ids)  # 3 requests × (3 prefixes + 1 KL prompt)
    groups = _groups(lm, layer, problem, 5)
    assert rows == 12 and [len(g.rows) for g in groups] == [4, 4, 4]  # not 5, 5, 2: the largest group sets the memory
    assert sorted(torch.cat([g.rows for g in groups]).tolist()) == list(range(rows))
    assert [len(g.rows) for g in _groups(lm, layer, problem, 12)] == [12]


def _one_group(lm):
    from rlsedit.locate.targets import _build_problem, _groups, _prepare

    layer, reqs, prefixes, config = _prepare(lm, LAYER, requests(), PREFIXES, NO_STOP, 64)
    problem = _build_problem(lm, reqs, prefixes, config)
    (group,) = _groups(lm, layer, problem, 64)
    return group, problem


def test_stopped_requests_leave_their_group(lm):
    # rows of a stopped request are never replayed again: the group shrinks in place
    group, problem = _one_group(lm)
    assert group.keep_active(torch.ones(3, dtype=torch.bool), problem) and group.rows.numel() == 12
    group.kl_ref = torch.arange(3.0).unsqueeze(1).expand(3, 5).clone()  # stands for requests 0, 1, 2
    assert group.keep_active(torch.tensor([True, False, True]), problem)
    kept = group.rows.numel()
    assert kept == 8 and set(problem.row_req[group.rows].tolist()) == {0, 2}
    assert group.base.shape[0] == group.calls.batch == kept
    for layer in group.calls.cache.layers[LAYER + 1:]:
        assert layer.keys.shape[0] == layer.values.shape[0] == kept
    assert set(problem.row_req[problem.tgt_row[group.tgt]].tolist()) == {0, 2}
    assert group.kl_req.tolist() == [0, 2]
    assert group.kl_ref[:, 0].tolist() == [0.0, 2.0]  # the KL reference follows its rows
    assert group.local[group.rows].tolist() == list(range(kept)) and int((group.local >= 0).sum()) == kept
    assert not group.keep_active(torch.zeros(3, dtype=torch.bool), problem)


def test_replay_cache_holds_only_the_blocks_above(lm):
    from rlsedit.errors import UnsupportedError
    from rlsedit.locate.forward import _DroppedLayer

    group, _ = _one_group(lm)
    layers = group.calls.cache.layers
    assert len(layers) == lm.n_layers
    assert all(isinstance(layer, _DroppedLayer) for layer in layers[:LAYER + 1])
    assert not any(isinstance(layer, _DroppedLayer) for layer in layers[LAYER + 1:])
    with pytest.raises(UnsupportedError, match="block 0"):
        layers[0].keys


def test_optimisation_lowers_the_loss_within_the_clamp(lm):
    before = compute_targets(lm, LAYER, requests(), PREFIXES, TargetConfig(lr=0.5, steps=1, clamp_norm_factor=4.0))
    assert before.steps.tolist() == [0, 0, 0]
    torch.testing.assert_close(before.z, before.initial)  # no step: z = h
    after = compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP)
    # Adam with MEMIT's step size is not monotone per request (the size term can outgrow a
    # small NLL gain), but the target always gains probability and the batch loss drops.
    assert (after.target_prob > before.target_prob).all()
    assert after.losses.mean() < before.losses.mean()
    bound = NO_STOP.clamp_norm_factor * after.initial.norm(dim=1)
    assert (after.delta.norm(dim=1) <= bound * (1 + 1e-5)).all()
    torch.testing.assert_close(after.initial, hidden_at_subject(lm, LAYER, requests()), rtol=1e-5, atol=1e-6)


def test_clamp_binds():
    lm = make_lm("llama")
    tight = TargetConfig(lr=0.5, steps=6, early_stop_loss=0.0, early_stop_nll=0.0, clamp_norm_factor=0.05)
    result = compute_targets(lm, LAYER, requests(), PREFIXES, tight)
    ratio = result.delta.norm(dim=1) / result.initial.norm(dim=1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.05), rtol=1e-4, atol=0)


def test_without_bare_prefix_initial_is_read_separately():
    lm = make_lm("llama")
    result = compute_targets(lm, LAYER, requests(), ["Because I said so. {}"], NO_STOP)
    torch.testing.assert_close(result.initial, hidden_at_subject(lm, LAYER, requests()), rtol=1e-5, atol=1e-6)
    reference = compute_targets_reference(lm, LAYER, requests(), ["Because I said so. {}"], NO_STOP)
    assert_rows_close(result.z, reference.z)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_has_no_blocks_to_replay(family):
    # At the last block a state only reaches its own position's logits: requests whose
    # subject ends the prompt (b, c). For request a the loss would not depend on δ except
    # through the size term, and Adam would amplify rounding noise in both paths.
    lm = make_lm(family)
    last = lm.n_layers - 1
    batched = compute_targets(lm, last, requests()[1:], PREFIXES, NO_STOP)
    reference = compute_targets_reference(lm, last, requests()[1:], PREFIXES, NO_STOP)
    assert_rows_close(batched.z, reference.z)
    assert (batched.target_prob > compute_targets(lm, last, requests()[1:], PREFIXES,
                                                  TargetConfig(lr=0.5, steps=1)).target_prob).all()


def test_float32_targets_within_bound_of_float64():
    lm = make_lm("llama")
    lm64 = copy.copy(lm)
    lm64.model = copy.deepcopy(lm.model).double()
    config = TargetConfig(lr=0.5, steps=5, early_stop_loss=0.0, early_stop_nll=0.0, clamp_norm_factor=4.0)
    z32 = compute_targets(lm, LAYER, requests(), PREFIXES, config).z.double()
    z64 = compute_targets(lm64, LAYER, requests(), PREFIXES, config).z.double()
    assert ((z32 - z64).norm() / z64.norm()).item() < 1e-4


def test_model_and_global_rng_untouched():
    lm = make_lm("gemma3_text")
    digest, state = weights_sha256(lm), torch.get_rng_state()
    compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP)
    assert weights_sha256(lm) == digest
    assert torch.equal(state, torch.get_rng_state())
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_non_finite_loss_is_refused_naming_the_edits():
    lm = make_lm("llama")
    with torch.no_grad():
        lm.model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(NumericalError, match="'a'"):
        compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP)


def test_empty_batch():
    lm = make_lm("llama")
    result = compute_targets(lm, LAYER, [], PREFIXES)
    assert result.z.shape == (0, lm.d_model) and result.steps.shape == (0,)


def test_bad_requests_are_refused():
    lm = make_lm("llama")
    missing = EditRequest(id="gone", prompt="Paris is in", subject="Rome", target_new="Italy")
    with pytest.raises(InvalidRequestError, match="gone"):
        compute_targets(lm, LAYER, requests() + [missing], PREFIXES)
    blank = EditRequest(id="blank", prompt="{} is in", subject="Rome", target_new=" ")
    with pytest.raises(InvalidRequestError, match="blank"):
        compute_targets(lm, LAYER, [blank], PREFIXES)


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", 2.5), ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1.0),
    ("kl_factor", float("inf")), ("clamp_norm_factor", 0), ("early_stop_loss", -0.1),
    ("kl_prompt", "is a"), ("kl_prompt", "{} {}"), ("lr", True), ("early_stop_top1", 1),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TargetConfig(**{field: value})


def test_config_defaults_documented():
    config = TargetConfig()
    assert config.to_dict() == {"steps": 25, "lr": None, "lr_scale": 1.0, "weight_decay": 0.5, "kl_factor": 0.0625,
                                "clamp_norm_factor": 0.75, "early_stop_loss": 0.05, "early_stop_nll": 0.05,
                                "kl_prompt": "{} is a", "dtype": "float32", "method": "adam",
                                "step_sizes": (0.15, 0.3, 0.45, 0.6, 0.75), "accept_nll": 0.05,
                                "early_stop_top1": False}
    assert all(TargetConfig.field_help().values())


def greedy_under_delta(lm, request, prefix, delta) -> bool:
    """Teacher-forced: is every target token the argmax with ``delta`` added at the subject's
    last token of ``prefix``'s prompt (an independent forward through the whole model)?"""
    from rlsedit.model.hooks import edit_output
    from rlsedit.requests import target_text

    text = prefix.replace("{}", request.prompt.replace("{}", request.subject))
    before_subject = prefix.replace("{}", request.prompt[:request.prompt.index("{}")] + request.subject)
    subj = len(lm.tokenizer(before_subject)["input_ids"]) - 1
    prompt = lm.tokenizer(text)["input_ids"]
    target = lm.tokenizer(target_text(request.target_new), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target[:-1]])

    def add(out):
        return out.index_put((torch.tensor([0]), torch.tensor([subj])), delta.view(1, -1), accumulate=True)

    with torch.no_grad(), edit_output(block(lm, LAYER), add):
        logits = lm.model(input_ids=ids).logits[0]
    first = len(prompt) - 1
    return logits[first:first + len(target)].argmax(dim=-1).tolist() == target


def test_most_probable_early_stop_stops_once_every_prompt_says_the_target(lm):
    # MPES (early_stop_top1): a request stops at the first step where its target is the greedy
    # continuation under every prompt, checked here by a separate forward with δ added by a hook
    # (one-token targets: a tiny random model cannot make a later target token the argmax)
    edits = [EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="the"),
             EditRequest(id="b", prompt="The mother tongue of {}", subject="Danielle Darrieux", target_new="a"),
             EditRequest(id="c", prompt="{}", subject="Toko Yasuda", target_new="is")]
    config = replace(NO_STOP, steps=25, early_stop_top1=True)
    batched = compute_targets(lm, LAYER, edits, PREFIXES, config)
    reference = compute_targets_reference(lm, LAYER, edits, PREFIXES, config)
    assert batched.steps.tolist() == reference.steps.tolist()
    assert_rows_close(batched.z, reference.z)
    stopped = [i for i, s in enumerate(batched.steps.tolist()) if s < config.steps - 1]
    assert stopped and len(stopped) < len(edits), batched.steps.tolist()  # fires for some, not all
    for i in range(len(edits)):
        said = [greedy_under_delta(lm, edits[i], p, batched.delta[i]) for p in PREFIXES]
        assert all(said) == (i in stopped)
        if i in stopped and batched.steps[i] > 0:  # one step earlier it was not yet said everywhere
            earlier = compute_targets(lm, LAYER, edits[i:i + 1], PREFIXES,
                                      replace(config, steps=int(batched.steps[i]), early_stop_top1=False))
            assert not all(greedy_under_delta(lm, edits[i], p, earlier.delta[0]) for p in PREFIXES)
    without = compute_targets(lm, LAYER, edits, PREFIXES, replace(config, early_stop_top1=False))
    assert batched.steps.sum() < without.steps.sum()


def test_nll_early_stop_fires_and_batched_matches_reference(lm):
    # Threshold on the target NLL alone, between the requests' NLLs after an uninterrupted run.
    free = compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP)
    nll = sorted((-free.target_prob.log()).tolist())
    config = TargetConfig(lr=0.5, steps=10, early_stop_loss=0.0, early_stop_nll=(nll[1] + nll[2]) / 2,
                          clamp_norm_factor=4.0)
    batched = compute_targets(lm, LAYER, requests(), PREFIXES, config)
    reference = compute_targets_reference(lm, LAYER, requests(), PREFIXES, config)
    assert batched.steps.tolist() == reference.steps.tolist()
    assert min(batched.steps.tolist()) < config.steps - 1
    assert_rows_close(batched.z, reference.z)


def test_bfloat16_weights_give_nearby_targets_and_leave_weights_exact(lm):
    """bfloat16 optimisation: z = h(float32) + δ, δ near the float32 one, weights restored bit for bit."""
    from rlsedit.locate.targets import weights_in

    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    full = compute_targets(lm, LAYER, requests(), PREFIXES, NO_STOP)
    half = compute_targets(lm, LAYER, requests(), PREFIXES, replace(NO_STOP, dtype="bfloat16"))
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    torch.testing.assert_close(half.initial, full.initial, rtol=1e-5, atol=1e-6)  # h read in float32
    assert torch.allclose(half.z, half.initial + half.delta)
    rel = (half.delta - full.delta).norm(dim=1) / full.delta.norm(dim=1)
    assert rel.max() < 0.1, rel
    assert (half.target_prob - full.target_prob).abs().max() < 0.05
    # an error inside restores the weights too
    with pytest.raises(RuntimeError, match="boom"):
        with weights_in(lm, torch.bfloat16):
            assert next(lm.model.parameters()).dtype == torch.bfloat16
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_dtype_is_checked():
    with pytest.raises(ValueError, match="dtype"):
        TargetConfig(dtype="float16")


def test_bfloat16_copies_are_reused_until_a_weight_changes():
    from rlsedit.locate.targets import weights_in
    from rlsedit.model.weights import get_W, set_W

    lm = make_lm("llama")
    with weights_in(lm, torch.bfloat16):
        pass
    memo = lm.cache[("weights_in", torch.bfloat16)]
    first = {name: entry[1] for name, entry in memo.items()}
    set_W(lm, 1, get_W(lm, 1) + 1.0)   # an edit writes one down projection in place
    with weights_in(lm, torch.bfloat16):
        down = block(lm, 1).mlp.down_proj.weight
        assert torch.equal(down, (get_W(lm, 1) + 0).T.to(torch.bfloat16))  # the new weight, cast
    changed = [name for name, entry in memo.items() if entry[1] is not first[name]]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
