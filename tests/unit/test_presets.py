"""Named settings (``PRESETS``) and the step-size factor ``v_lr_scale`` they use: what a preset
sets, how the CLI and ``bench speed`` take it, and that the factor is applied exactly once."""

from __future__ import annotations

import argparse
import json

import pytest

from locate_tiny import make_lm
from rlsedit.bench.speed import SpeedBenchConfig, target_overrides
from rlsedit.editors.config import PRESETS, MEMITConfig, RLSEditConfig, preset_overrides
from rlsedit.errors import InvalidRequestError
from rlsedit.locate.target_config import TargetConfig
from rlsedit.session.cli import _load_config


@pytest.fixture(scope="module")
def lm():
    return make_lm("llama")


def test_lr_scale_multiplies_the_family_step_once(lm):
    family = lm.arch.target_lr
    resolved = TargetConfig(lr_scale=2.0).for_model(lm)
    assert resolved.lr == pytest.approx(2.0 * family) and resolved.lr_scale == 1.0
    assert resolved.for_model(lm).lr == pytest.approx(2.0 * family)  # resolving again changes nothing
    assert TargetConfig(lr=0.3, lr_scale=3.0).for_model(lm).lr == pytest.approx(0.9)
    assert TargetConfig().for_model(lm).lr == pytest.approx(family)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "2"])
def test_lr_scale_must_be_a_positive_number(bad):
    with pytest.raises(InvalidRequestError, match="v_lr_scale"):
        RLSEditConfig(v_lr_scale=bad)


def test_editor_target_config_carries_the_scale(lm):
    config = RLSEditConfig(v_lr_scale=2.0).target_config()
    assert config.lr_scale == 2.0 and config.lr is None
    assert config.for_model(lm).lr == pytest.approx(2.0 * lm.arch.target_lr)


def test_fast_preset_fields_and_overrides():
    fast = RLSEditConfig.preset("fast")
    assert (fast.context_count, fast.v_lr_scale) == (2, 2.0)
    for name, value in PRESETS["fast"].items():
        assert getattr(fast, name) == value
    assert RLSEditConfig.preset("fast", context_count=3).context_count == 3
    assert isinstance(MEMITConfig.preset("fast"), MEMITConfig)
    with pytest.raises(InvalidRequestError, match="unknown preset 'quick'.*fast"):
        preset_overrides("quick")


def test_default_config_dict_has_no_scale_so_older_states_compare_equal():
    assert "v_lr_scale" not in RLSEditConfig().to_dict()
    assert RLSEditConfig.preset("fast").to_dict()["v_lr_scale"] == 2.0
    assert RLSEditConfig.from_dict(RLSEditConfig.preset("fast").to_dict()) == RLSEditConfig.preset("fast")


def test_cli_preset_under_hparams(tmp_path):
    hparams = tmp_path / "h.json"
    hparams.write_text(json.dumps({"context_count": 4, "mu_reg": 2.0}))
    args = argparse.Namespace(method=None, preset="fast", hparams=str(hparams))
    config = _load_config(args)
    assert (config.context_count, config.v_lr_scale, config.mu_reg) == (4, 2.0, 2.0)  # the file wins
    assert _load_config(argparse.Namespace(method=None, preset="fast", hparams=None)) == RLSEditConfig.preset("fast")
    assert _load_config(argparse.Namespace(method=None, preset=None, hparams=None)) is None
    with pytest.raises(InvalidRequestError, match="unknown preset"):
        _load_config(argparse.Namespace(method=None, preset="quick", hparams=None))


def test_bench_speed_takes_a_preset_name_as_a_target(tmp_path):
    config = SpeedBenchConfig(data="x.json", targets=("adam", "fast"))
    assert target_overrides(config, "fast") == PRESETS["fast"]
    assert target_overrides(config, "adam") == {"v_method": "adam"}
    own = SpeedBenchConfig(data="x.json", targets=("fast",), variants={"fast": {"context_count": 1}})
    assert target_overrides(own, "fast") == {"context_count": 1}  # a variant of that name wins
    with pytest.raises(InvalidRequestError, match="targets must be distinct names"):
        SpeedBenchConfig(data="x.json", targets=("quick",))
