"""The target log (rlsedit.bench.target_log): each batch's value-target residuals on disk, so a
batch can be rebuilt without optimising, to the same weights bit for bit."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import make_lm
from rlsedit.bench.target_log import TargetLog, batch_key
from rlsedit.editors import get_editor_class
from rlsedit.errors import StateCorruptError, StateMismatchError
from rlsedit.model.weights import get_W
from rlsedit.requests import EditRequest

REQUESTS = [EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(id="b", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="Swedish"),
            EditRequest(id="c", prompt="{} plays the", subject="Toko Yasuda", target_new="piano"),
            EditRequest(id="d", prompt="{} was born in", subject="Marie Curie", target_new="Oslo")]
FAST = dict(layers=(1, 2), context_count=1, mom2_update_weight=10.0, v_num_grad_steps=6)
ROME_FAST = dict(layers=(1,), context_template_length_params=[[5, 1]])  # ROME's one layer, one short prefix


def _moments(lm, n=400):
    X = torch.randn(lm.d_k, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


def _editor(method="rlsedit", log=None, **changes):
    lm = make_lm("llama")
    cls = get_editor_class(method)
    editor = cls(lm, cls.config_class(**{**FAST, **changes}), moments=_moments(lm))
    editor.target_log = log
    return editor


def _weights(editor):
    return {l: get_W(editor.lm, l) for l in editor.layers}


def test_round_trip_rounds_to_float16_and_checks_the_batch(tmp_path):
    log = TargetLog(tmp_path / "targets")
    delta = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    assert log.lookup(["a", "b", "c"]) is None and not log.has(["a", "b", "c"])
    stored = log.record(["a", "b", "c"], delta)
    assert stored.dtype == torch.float32 and torch.equal(stored, delta.half().float())
    assert not torch.equal(stored, delta)  # rounded: random float32 entries are not float16 numbers
    assert (stored - delta).abs().le(delta.abs() * 2 ** -11 + 1e-7).all()
    assert torch.equal(log.lookup(["a", "b", "c"]), stored)
    assert log.lookup(["a", "c", "b"]) is None  # the order is part of the batch
    big = delta * 1e5  # beyond float16's range: kept as float32, exactly
    assert torch.equal(log.record(["x", "y", "z"], big), big)
    with pytest.raises(StateMismatchError, match="not finite"):
        log.record(["n"], torch.tensor([[float("nan"), 1.0]]))
    assert not log.has(["n"])


def test_a_file_of_another_batch_or_a_damaged_one_is_refused(tmp_path):
    log = TargetLog(tmp_path)
    log.record(["a"], torch.ones(1, 4))
    a_file = tmp_path / f"{batch_key(['a'])}.safetensors"
    (tmp_path / f"{batch_key(['b'])}.safetensors").write_bytes(a_file.read_bytes())  # a's file under b's name
    with pytest.raises(StateMismatchError, match="not of"):
        log.lookup(["b"])
    a_file.write_bytes(b"not safetensors")
    with pytest.raises(StateCorruptError):
        log.lookup(["a"])


@pytest.mark.parametrize("method", ["rlsedit", "alphaedit"])
def test_a_replayed_stream_writes_the_same_weights_without_optimising(tmp_path, monkeypatch, method):
    log = TargetLog(tmp_path / "targets")
    live = _editor(method, log)
    live.partial_fit(REQUESTS[:2]).partial_fit(REQUESTS[2:])
    assert len(list(log.folder.iterdir())) == 2
    assert live.history_[0].info["target_steps"]  # optimised

    import rlsedit.locate.fasttargets as fasttargets

    def no_optimising(*args, **kwargs):
        raise AssertionError("a logged batch must not be optimised again")

    monkeypatch.setattr(fasttargets, "compute_value_targets", no_optimising)
    replay = _editor(method, log)
    replay.partial_fit(REQUESTS[:2]).partial_fit(REQUESTS[2:])
    assert replay.history_[1].info["targets_replayed"] is True
    for l, W in _weights(live).items():
        assert torch.equal(W, _weights(replay)[l]), l
    for name, tensor in live.history_[1].tensors.items():
        assert torch.equal(tensor, replay.history_[1].tensors[name]), name


def test_the_logged_run_differs_from_an_unlogged_one_only_by_the_rounding(tmp_path):
    plain = _editor()
    plain.partial_fit(REQUESTS[:2])
    logged = _editor(log=TargetLog(tmp_path))
    logged.partial_fit(REQUESTS[:2])
    for l in plain.layers:
        W0, a, b = plain.W0[l], _weights(plain)[l], _weights(logged)[l]
        change = (a - W0).norm()
        assert change > 0
        assert (a - b).norm() <= 1e-3 * change  # float16 residuals: relative 2⁻¹¹ per entry


def test_ft_logs_nothing_and_rome_logs_each_request():
    assert get_editor_class("ft").logs_value_targets is False
    for method in ("rlsedit", "rlsedit-official", "alphaedit", "memit", "memit-seq", "rome"):
        assert get_editor_class(method).logs_value_targets is True
    assert get_editor_class("memit").target_log_entries(REQUESTS[:2]) == [("a", "b")]
    assert get_editor_class("rome").target_log_entries(REQUESTS[:2]) == [("a",), ("b",)]


def test_rome_replays_each_logged_request_and_optimises_only_the_others(tmp_path, monkeypatch):
    """ROME optimises one request at a time on the model its predecessor left: each request's
    residual is logged on its own, so a batch stopped part-way keeps the requests already done."""
    log = TargetLog(tmp_path / "targets")
    live = _editor("rome", log, **ROME_FAST)
    live.partial_fit(REQUESTS[:2]).partial_fit(REQUESTS[2:])
    assert sorted(p.name for p in log.folder.iterdir()) == sorted(f"{batch_key([r.id])}.safetensors"
                                                                   for r in REQUESTS)
    assert len(live.history_[1].info["target_steps"]) == 2 and "targets_replayed" not in live.history_[1].info

    import rlsedit.locate.targets as targets

    optimised = []
    real = targets.compute_targets

    def counted(lm, layer, requests, *args, **kwargs):
        optimised.extend(r.id for r in requests)
        return real(lm, layer, requests, *args, **kwargs)

    monkeypatch.setattr(targets, "compute_targets", counted)
    assert log.has_batch(get_editor_class("rome"), REQUESTS[2:])
    (log.folder / f"{batch_key(['d'])}.safetensors").unlink()  # stopped after c's target, before d's
    assert log.has_batch(live, REQUESTS[:3]) and not log.has_batch(live, REQUESTS[2:])
    replay = _editor("rome", log, **ROME_FAST)
    replay.partial_fit(REQUESTS[:2]).partial_fit(REQUESTS[2:])
    assert optimised == ["d"]
    assert replay.history_[0].info["targets_replayed"] is True
    assert replay.history_[1].info["targets_replayed_edits"] == 1
    assert "targets_replayed" not in replay.history_[1].info
    assert log.has(["d"]) and log.has_batch(replay, REQUESTS[2:])  # logged again
    for l, W in _weights(live).items():
        assert torch.equal(W, _weights(replay)[l]), l
