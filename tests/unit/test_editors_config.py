"""The editors' configs: the value-target settings defined once (TargetConfig), the flat
``v_*`` names of saved states and official hparams files still loading, and every invalid
value refused with InvalidRequestError naming the field."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from rlsedit.editors import EDITORS
from rlsedit.editors.config import (AlphaEditConfig, EditConfig, FTConfig, MEMITConfig, RLSEditConfig,
                                    ROMEConfig)
from rlsedit.errors import InvalidRequestError
from rlsedit.locate.target_config import HPARAMS_NAMES, TargetConfig

# RLSEditConfig().to_dict() as state manifests written before the settings were unified hold it
STORED = {"layers": None, "v_num_grad_steps": 25, "v_lr": None, "v_weight_decay": 0.5, "kl_factor": 0.0625,
          "clamp_norm_factor": 0.75, "v_early_stop_loss": 0.05, "v_early_stop_nll": 0.05, "v_dtype": "float32",
          "v_method": "adam", "v_accept_nll": 0.05, "context_count": 5, "context_length": 10,
          "key_average": "per_type", "mom2_n_samples": 100000, "mom2_update_weight": None, "seed": 0,
          "lambda_reg": 0.0, "mu_reg": 1.0, "state_dtype": "float32"}


def test_the_target_settings_take_default_and_help_from_target_config():
    target = {f.name: f for f in dataclasses.fields(TargetConfig)}
    editor = {f.name: f for f in dataclasses.fields(EditConfig)}
    assert set(HPARAMS_NAMES) <= set(editor)
    for name, target_name in HPARAMS_NAMES.items():
        assert editor[name].default == target[target_name].default, name
        assert editor[name].metadata["help"].endswith(target[target_name].metadata["help"]), name
    # an editor's defaults are TargetConfig's defaults
    assert RLSEditConfig().target_config() == TargetConfig()
    # ROME's clamp is relative to the MLP output, with its own default and help
    rome = {f.name: f for f in dataclasses.fields(ROMEConfig)}
    assert rome["clamp_norm_factor"].default == 4.0 and "‖m‖" in rome["clamp_norm_factor"].metadata["help"]
    assert ROMEConfig().target_config().clamp_norm_factor == 4.0


def test_a_stored_flat_config_loads_and_round_trips():
    config = RLSEditConfig.from_dict(STORED)
    assert config == RLSEditConfig() and config.to_dict() == STORED
    changed = RLSEditConfig.from_dict(STORED | {"v_lr": 0.7, "v_method": "verify", "kl_factor": 0.1})
    assert changed.target_config() == TargetConfig(lr=0.7, method="verify", kl_factor=0.1)


def test_an_official_hparams_file_loads():
    official = {"layers": [4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "layer_selection": "all",
                "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.1, "v_loss_layer": 31,
                "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000,
                "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "mom2_dataset": "wikipedia",
                "mom2_n_samples": 100000, "mom2_dtype": "float32", "nullspace_threshold": 2e-2, "L2": 10}
    config = AlphaEditConfig.from_dict(official)
    assert config.layers == (4, 5, 6, 7, 8) and config.mom2_update_weight == 15000
    assert config.nullspace_threshold == 2e-2 and config.L2 == 10
    assert config.target_config() == TargetConfig(steps=20, lr=0.1)


@pytest.mark.parametrize("cls, field, value", [
    (RLSEditConfig, "v_num_grad_steps", 0), (RLSEditConfig, "v_num_grad_steps", 2.5),
    (RLSEditConfig, "v_lr", 0.0), (RLSEditConfig, "v_weight_decay", -1.0), (RLSEditConfig, "kl_factor", math.inf),
    (RLSEditConfig, "clamp_norm_factor", 0.0), (RLSEditConfig, "v_early_stop_nll", math.nan),
    (RLSEditConfig, "v_dtype", "float16"), (RLSEditConfig, "v_method", "sgd"), (RLSEditConfig, "v_accept_nll", 0),
    (RLSEditConfig, "layers", (2, 1)), (RLSEditConfig, "layers", ("3",)), (RLSEditConfig, "context_count", -1),
    (RLSEditConfig, "context_length", 0), (RLSEditConfig, "key_average", "mean"),
    (RLSEditConfig, "mom2_n_samples", "many"), (RLSEditConfig, "mom2_update_weight", -1.0),
    (RLSEditConfig, "mu_reg", math.nan), (RLSEditConfig, "lambda_reg", True), (RLSEditConfig, "state_dtype", "half"),
    (MEMITConfig, "v_lr", "fast"), (AlphaEditConfig, "nullspace_energy", 1.0), (AlphaEditConfig, "L2", 0),
    (AlphaEditConfig, "nullspace_threshold", -1.0), (ROMEConfig, "context_template_length_params", ((1, 3),)),
    (FTConfig, "num_steps", 0), (FTConfig, "lr", "x"), (FTConfig, "norm_constraint", 0.0),
])
def test_every_invalid_value_is_refused_naming_its_field(cls, field, value):
    with pytest.raises(InvalidRequestError, match=f"^{field} "):
        cls(**{field: value})


def test_rome_edits_one_layer():
    with pytest.raises(InvalidRequestError, match="ROME edits exactly one layer"):
        ROMEConfig(layers=(1, 2))


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_every_config_survives_its_json_round_trip(method):
    """What a state's manifest stores compares equal to the config it came from (ROME's tuple of
    prefix lengths once made a fresh bench state look like another configuration)."""
    config = EDITORS[method].config_class()
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored == config.to_dict()
    assert EDITORS[method].config_class.from_dict(stored) == config
