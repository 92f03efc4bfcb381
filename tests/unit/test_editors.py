"""Editors on tiny random models: every method runs, batches are transactions, RLSEdit's
recursion equals sequential MEMIT (issue: same weights, fraction of the cost), undo is exact."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import make_lm
from rlsedit.editors import (EDITORS, FT, MEMIT, ROME, AlphaEdit, EditRecord, MEMITSeq, RLSEdit, RLSEditConfig,
                             RLSEditOfficial, get_editor_class)
from rlsedit.editors.config import AlphaEditConfig, MEMITSeqConfig
from rlsedit.errors import InvalidRequestError, NumericalError, StateMismatchError, UnsupportedError
from rlsedit.model.weights import get_W
from rlsedit.requests import EditRequest

REQUESTS = [
    EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(id="b", prompt="{} plays", subject="Michael Jordan", target_new="baseball"),
    EditRequest(id="c", prompt="{}, which is located in", subject="Autonomous University of Madrid",
                target_new="Sweden"),
    EditRequest(id="d", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="French"),
]
LAYERS = (1, 2)


def _moments(lm, seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(lm.d_k, n, generator=g, dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


def _target_logprob(lm, request) -> float:
    tok = lm.tokenizer
    ids = tok(request.text, return_tensors="pt")["input_ids"]
    first = tok(" " + request.target_new, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(torch.log_softmax(lm.model(ids).logits[0, -1], -1)[first])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("method", sorted(EDITORS))
def test_every_method_edits_and_raises_the_target(family, method):
    lm = make_lm(family)
    cls = get_editor_class(method)
    layers = (2,) if cls is ROME else LAYERS
    config = cls.config_class(layers=layers, mom2_update_weight=10.0, context_count=1, v_num_grad_steps=8)
    editor = cls(lm, config, moments=_moments(lm))
    before = [_target_logprob(lm, r) for r in REQUESTS[:2]]
    W0 = {l: get_W(lm, l) for l in layers}
    record = editor.propose(REQUESTS[:2]).commit()
    after = [_target_logprob(lm, r) for r in REQUESTS[:2]]
    assert editor.n_edits_ == 2 and editor.n_batches_ == 1
    for l in layers:
        W = get_W(lm, l)
        assert torch.isfinite(W).all()
        if cls is not AlphaEdit:  # random full-rank moments leave AlphaEdit a (nearly) empty null space
            assert not torch.equal(W, W0[l]), f"{method} did not change layer {l}"
    if cls is ROME:  # the rank-one update makes the last key map exactly to its target
        K, V = record.tensors["layers.2.K"][:, -1:], record.tensors["layers.2.V"][-1:]
        assert torch.allclose(K.T @ get_W(lm, 2), V, atol=1e-3 * float(V.abs().max()))
    # rlsedit-official subtracts KᵀW from a residual (its bug), so it may move the wrong way;
    # ROME on a random tiny model can overshoot at the bare prompt (checked exactly above)
    if cls not in (AlphaEdit, RLSEditOfficial, ROME):
        assert sum(after) > sum(before), f"{method}: target log-prob fell {before} -> {after}"


def test_alphaedit_updates_inside_the_null_space():
    lm = make_lm("llama")
    # corpus keys span only half the key space: the other half is AlphaEdit's null space
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(lm.d_k, lm.d_k, generator=g, dtype=torch.float64))[0]
    half = basis[:, : lm.d_k // 2]
    E = half @ torch.diag(torch.linspace(1, 2, lm.d_k // 2, dtype=torch.float64)) @ half.T
    moments = {l: E for l in range(lm.n_layers)}
    editor = AlphaEdit(lm, AlphaEditConfig(layers=LAYERS, context_count=1), moments=moments)
    W0 = get_W(lm, 2).double()
    editor.partial_fit(REQUESTS[:2])
    delta = get_W(lm, 2).double() - W0
    assert delta.norm() > 0
    # the update leaves corpus keys' outputs unchanged: (W − W0)ᵀ k = 0 for k in span(E)
    assert (half.T @ delta).norm() / delta.norm() < 1e-4


def test_failed_batch_changes_nothing(monkeypatch):
    lm = make_lm("llama")
    editor = RLSEdit(lm, RLSEditConfig(layers=LAYERS, context_count=1), moments=_moments(lm))
    editor.partial_fit(REQUESTS[:1])
    weights = {l: get_W(lm, l) for l in LAYERS}
    C = {l: editor.states_[l].C_.clone() for l in LAYERS}

    import rlsedit.locate.keys as keys_module
    real = keys_module.compute_keys

    def failing(lm_, layer, *a, **k):
        if layer == LAYERS[-1]:  # the first layer was already written when this fails
            raise NumericalError("injected failure")
        return real(lm_, layer, *a, **k)

    monkeypatch.setattr(keys_module, "compute_keys", failing)
    with pytest.raises(NumericalError):
        editor.partial_fit(REQUESTS[1:2])
    for l in LAYERS:
        assert torch.equal(get_W(lm, l), weights[l])
        assert torch.equal(editor.states_[l].C_, C[l])
    assert editor.n_edits_ == 1


def test_rlsedit_with_lambda_zero_equals_sequential_memit():
    """With λ = 0 the RLS recursion and MEMIT re-solved with the accumulated key Gram give the
    same weights at every batch: exactly on the same keys/targets (float64), and within 1e-5
    when each runs its own stream on the model."""
    lm_a, lm_b = make_lm("llama"), make_lm("llama")
    moments = _moments(lm_a)
    common = dict(layers=LAYERS, mom2_update_weight=10.0, context_count=1)
    rls = RLSEdit(lm_a, RLSEditConfig(lambda_reg=0.0, mu_reg=1.0, state_dtype="float64", **common), moments=moments)
    seq = MEMITSeq(lm_b, MEMITSeqConfig(**common), moments=moments)
    replay = MEMITSeq(make_lm("llama"), MEMITSeqConfig(**common), moments=moments)
    for batch in (REQUESTS[:2], REQUESTS[2:3], REQUESTS[3:]):
        proposal = rls.propose(batch)
        record = proposal.commit()
        seq.partial_fit(batch)
        replay.apply_record(record)  # the same K, V through MEMIT-seq's d_k×d_k solve
        for l in LAYERS:
            W_rls = rls.states_[l].W_
            W_replay = get_W(replay.lm, l).double()
            W_seq = get_W(seq.lm, l).double()
            assert torch.allclose(W_replay, W_rls.float().double(), rtol=0, atol=1e-6 * W_rls.abs().max())
            rel = float((W_seq - W_rls).norm() / W_rls.norm())
            assert rel < 1e-5, f"layer {l}: rlsedit vs memit-seq differ by {rel:.2e}"


@pytest.mark.parametrize("preserve", [0, 3])  # with preservation rows, edit "a" owns K's column 0 and Kp's 0..2
def test_rlsedit_undo_equals_the_stream_without_that_edit(preserve):
    lm = make_lm("llama")
    moments = _moments(lm)
    config = RLSEditConfig(layers=LAYERS, state_dtype="float64", context_count=1, mom2_update_weight=10.0,
                           preserve_count=preserve)
    editor = RLSEdit(lm, config, moments=moments)
    records = [editor.propose(b).commit() for b in (REQUESTS[:2], REQUESTS[2:])]
    editor.propose_undo(records[0], 1).commit()  # remove edit "b"

    fresh = RLSEdit(make_lm("llama"), config, moments=moments, prefixes=editor.prefixes_)
    kept = EditRecord(ids=("a",), tensors={k: (v[:, :preserve] if k.endswith(".Kp") else v[:preserve]
                                               if k.endswith(".Vp") else v[:, :1] if k.endswith(".K") else v[:1])
                                           for k, v in records[0].tensors.items()})
    fresh.apply_record(kept)
    fresh.apply_record(records[1])
    for l in LAYERS:
        a, b = editor.states_[l].W_, fresh.states_[l].W_
        assert float((a - b).norm() / b.norm()) < 1e-9
    assert editor.n_edits_ == 3


@pytest.mark.parametrize("cls", [MEMIT, ROME, FT, AlphaEdit, RLSEditOfficial])
def test_methods_without_exact_undo_say_so(cls):
    lm = make_lm("llama")
    editor = cls(lm, cls.config_class(layers=(2,), context_count=1), moments=_moments(lm))
    with pytest.raises(UnsupportedError):
        editor.propose_undo(EditRecord(ids=("x",), tensors={}), 0)


def test_state_dict_round_trip_restores_weights_and_state():
    lm = make_lm("llama")
    moments = _moments(lm)
    config = RLSEditConfig(layers=LAYERS, context_count=1)
    editor = RLSEdit(lm, config, moments=moments)
    editor.partial_fit(REQUESTS[:2])
    tensors = editor.state_dict()
    other = RLSEdit(make_lm("llama"), config, moments=moments, prefixes=editor.prefixes_)
    other.load_state_dict(tensors, n_edits=2, n_batches=1)
    record = editor.propose(REQUESTS[2:3]).commit()
    other.apply_record(record)
    for l in LAYERS:
        assert torch.equal(get_W(lm, l), get_W(other.lm, l))
        assert torch.equal(editor.states_[l].C_, other.states_[l].C_)


def test_configs_validate_and_load_official_hparams():
    official = {"model_name": "Llama3-8B", "layers": [4, 5, 6, 7, 8], "clamp_norm_factor": 0.75,
                "v_num_grad_steps": 25, "v_lr": 0.1, "v_loss_layer": 31, "v_weight_decay": 0.5,
                "kl_factor": 0.0625, "mom2_update_weight": 15000, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
                "mom2_n_samples": 100000, "nullspace_threshold": 2e-2, "L2": 4, "lambda_reg": 0, "mu_reg": 1.0}
    c = RLSEditConfig.from_dict(official)
    assert c.layers == (4, 5, 6, 7, 8) and c.v_lr == 0.1 and c.mom2_update_weight == 15000
    assert RLSEditConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="lambda_reg"):
        RLSEditConfig(lambda_reg=-1.0)
    with pytest.raises(ValueError, match="layers"):
        RLSEditConfig(layers=(3, 2))
    with pytest.raises(InvalidRequestError, match="unknown method"):
        get_editor_class("nope")


def test_non_finite_values_name_their_edits():
    from rlsedit.editors.base import _check_finite
    from rlsedit.errors import NumericalError

    ids = ("a", "b", "c")
    K = torch.zeros(4, 3)
    K[1, 2] = float("nan")
    with pytest.raises(NumericalError, match=r"layers\.1\.K has non-finite values \(edits c\)"):
        _check_finite("layers.1.K", K, ids)
    z = torch.zeros(3, 5)
    z[0, 1] = float("inf")
    z[1, 0] = float("-inf")
    with pytest.raises(NumericalError, match=r"value target z has non-finite values \(edits a, b\)"):
        _check_finite("value target z", z, ids)
    W = torch.zeros(3, 3)
    W[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"layers\.2\.W has non-finite values; nothing"):
        _check_finite("layers.2.W", W, ids)
    _check_finite("layers.2.W", torch.ones(3, 3), ids)  # finite: no error


@pytest.mark.parametrize("family, expected", [("llama", 0.5), ("gpt2", 0.5), ("gemma3_text", 2.0)])
def test_an_unset_target_lr_is_the_model_familys_and_an_explicit_one_wins(family, expected):
    lm = make_lm(family)
    unset = RLSEdit(lm, RLSEditConfig(layers=LAYERS), moments=_moments(lm))
    assert unset.config.v_lr is None and unset._target_config().lr == expected
    assert lm.arch.target_lr == expected
    explicit = RLSEdit(lm, RLSEditConfig(layers=LAYERS, v_lr=0.7), moments=_moments(lm))
    assert explicit._target_config().lr == 0.7


def test_rlsedit_holds_one_W0_per_layer_after_init_and_after_a_reload():
    lm = make_lm()
    editor = RLSEdit(lm, RLSEditConfig(layers=LAYERS), moments=_moments(lm), prefixes=["{}"])
    editor.partial_fit(REQUESTS[:2])
    def same_memory(a, b):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    for l in LAYERS:
        assert same_memory(editor.states_[l].W0, editor.W0[l])
    restored = RLSEdit(make_lm(), RLSEditConfig(layers=LAYERS), moments=_moments(lm), prefixes=["{}"])
    restored.load_state_dict({k: v.clone() for k, v in editor.state_dict().items()}, n_edits=2, n_batches=1)
    for l in LAYERS:
        assert same_memory(restored.states_[l].W0, restored.W0[l])
        assert torch.equal(restored.states_[l].W_, editor.states_[l].W_)


def test_the_state_file_holds_W0_once_and_older_files_with_a_second_copy_still_load():
    lm = make_lm()
    editor = RLSEdit(lm, RLSEditConfig(layers=LAYERS), moments=_moments(lm), prefixes=["{}"])
    editor.partial_fit(REQUESTS[:2])
    saved = {k: v.clone() for k, v in editor.state_dict().items()}
    assert not [k for k in saved if k.endswith(".rls.W0")]
    assert all(f"layers.{l}.W0" in saved for l in LAYERS)
    # a file written before W0 was dropped from the RLS part: the second copy is read and checked
    older = dict(saved, **{f"layers.{l}.rls.W0": saved[f"layers.{l}.W0"].clone() for l in LAYERS})
    restored = RLSEdit(make_lm(), RLSEditConfig(layers=LAYERS), moments=_moments(lm), prefixes=["{}"])
    restored.load_state_dict(older, n_edits=2, n_batches=1)
    for l in LAYERS:
        assert torch.equal(restored.states_[l].W0, editor.W0[l])
        assert torch.equal(restored.states_[l].C_, editor.states_[l].C_)
    inconsistent = dict(older, **{f"layers.{LAYERS[0]}.rls.W0": older[f"layers.{LAYERS[0]}.W0"] + 1.0})
    fresh = RLSEdit(make_lm(), RLSEditConfig(layers=LAYERS), moments=_moments(lm), prefixes=["{}"])
    with pytest.raises(StateMismatchError, match=rf"layer {LAYERS[0]}: the RLS state's W0 differs"):
        fresh.load_state_dict(inconsistent, n_edits=2, n_batches=1)


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("cls", [RLSEdit, MEMITSeq, AlphaEdit])
def test_a_state_read_onto_the_cpu_continues_on_the_models_device_as_if_never_stopped(cls, device):
    # a state file is read onto the CPU; on a GPU model the editor must hold it on the GPU
    config = cls.config_class(layers=LAYERS, context_count=1)
    lm = make_lm("llama")
    lm.model.to(device)
    editor = cls(lm, config, moments=_moments(lm))
    editor.partial_fit(REQUESTS[:2])
    read_back = {name: t.detach().to("cpu").clone() for name, t in editor.state_dict().items()}
    other_lm = make_lm("llama")
    other_lm.model.to(device)
    other = cls(other_lm, config, moments=_moments(lm), prefixes=editor.prefixes_)
    other.load_state_dict(read_back, n_edits=2, n_batches=1)
    assert {t.device.type for t in other.held_tensors().values()} == {torch.device(device).type}
    editor.partial_fit(REQUESTS[2:])
    other.partial_fit(REQUESTS[2:])
    assert other.diagnostics().keys() == editor.diagnostics().keys()
    for l in LAYERS:
        a, b = get_W(other.lm, l), get_W(editor.lm, l)
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_rows_per_target_pass_change_how_targets_run_not_what_they_are():
    """target_rows (a runtime setting, e.g. wide passes on a GPU) regroups the rows of the
    value-target optimisation; the weights written agree with the default's to float rounding,
    and a value that is not a positive integer is refused before anything runs."""
    from rlsedit.locate import targets as targets_module

    config = RLSEditConfig(layers=LAYERS, mom2_update_weight=10.0, context_count=2, v_num_grad_steps=6)
    written = {}
    calls = []
    original = targets_module._groups

    def spy(lm, layer, problem, batch_size):
        groups = original(lm, layer, problem, batch_size)
        calls.append((batch_size, len(groups)))
        return groups

    for rows in (None, 1, 500):
        lm = make_lm("llama")
        W0 = {l: get_W(lm, l).clone() for l in LAYERS}
        targets_module._groups, calls[:] = spy, []
        try:
            RLSEdit(lm, config, moments=_moments(lm), target_rows=rows).partial_fit(REQUESTS)
        finally:
            targets_module._groups = original
        assert calls and calls[0][0] == (targets_module.TARGET_BATCH_SIZE if rows is None else rows)
        assert all(not torch.equal(get_W(lm, l), W0[l]) for l in LAYERS)
        written[rows] = ({l: get_W(lm, l).clone() for l in LAYERS}, calls[0][1])
    # 4 requests x (2 prefixes + the bare prompt) + 4 KL rows = 16 rows: one group by default and at
    # 500, one row per group at 1
    assert written[None][1] == written[500][1] == 1 and written[1][1] == 16
    for rows in (1, 500):
        for l in LAYERS:
            ref, got = written[None][0][l], written[rows][0][l]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    lm = make_lm("llama")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InvalidRequestError, match="target_rows"):
            RLSEdit(lm, config, moments=_moments(lm), target_rows=bad)
