"""load_stats_file: MEMIT/AlphaEdit/RLSEdit statistics files, read without unpickling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlsedit.errors import InvalidRequestError, NumericalError, StateCorruptError, StateMismatchError
from rlsedit.locate.stats_files import load_stats_file

D_K = 6


def memit_state(n_tokens=50, seed=0, dtype=np.float32):
    """What MEMIT's CombinedStat(mom2=SecondMoment()).state_dict() holds (+ tally's sample_size)."""
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n_tokens, D_K)).astype(dtype)
    return K, {
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "mom2.count": np.array(n_tokens),
        "mom2.mom2": K.T @ K,  # MEMIT stores the SUM Σ k kᵀ
        "sample_size": np.array(100000),
    }


def test_memit_npz_is_the_sum_over_count(tmp_path):
    K, state = memit_state(dtype=np.float64)
    path = tmp_path / "model.layers.3.mlp.down_proj_float64_mom2_100000.npz"
    np.savez(path, **state)
    moment = load_stats_file(path, d_k=D_K)
    assert moment.count == 50 and moment.mom.dtype == torch.float64
    expected = torch.from_numpy(K.T @ K / 50)  # SecondMoment.moment()
    torch.testing.assert_close(moment.mom, expected, rtol=1e-12, atol=1e-12)


def test_memit_npz_float32(tmp_path):
    K, state = memit_state(dtype=np.float32)
    np.savez(tmp_path / "s.npz", **state)
    moment = load_stats_file(tmp_path / "s.npz")
    assert moment.mom.dtype == torch.float64
    torch.testing.assert_close(moment.mom, torch.from_numpy((K.T @ K).astype(np.float64) / 50))


def test_bare_second_moment_state_in_pt(tmp_path):
    K, state = memit_state()
    path = tmp_path / "s.pt"
    torch.save({"mom2": torch.from_numpy(state["mom2.mom2"]), "count": 50}, path)
    moment = load_stats_file(path, d_k=D_K)
    torch.testing.assert_close(moment.mom, torch.from_numpy(state["mom2.mom2"]).double() / 50)
    assert moment.count == 50


def test_memit_keys_in_pt(tmp_path):
    _, state = memit_state()
    path = tmp_path / "s.pt"
    torch.save({"mom2.mom2": torch.from_numpy(state["mom2.mom2"]), "mom2.count": torch.tensor(50)}, path)
    assert load_stats_file(path).count == 50


def test_wrong_shape_for_the_model(tmp_path):
    _, state = memit_state()
    np.savez(tmp_path / "s.npz", **state)
    with pytest.raises(StateMismatchError, match=r"statistics are 6x6 but the model's down projection has d_k = 1536"):
        load_stats_file(tmp_path / "s.npz", d_k=1536)


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"mom2.mom2": np.array([{"a": 1}], dtype=object), "mom2.count": np.array(3)})
    with pytest.raises(StateCorruptError, match="without unpickling"):
        load_stats_file(path)


class NotATensor:
    pass


def test_pt_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"mom2": NotATensor(), "count": 3}, path)
    with pytest.raises(StateCorruptError, match=r"weights_only=True"):
        load_stats_file(path)


def test_pt_bare_tensor_is_refused(tmp_path):
    path = tmp_path / "cov.pt"
    torch.save(torch.eye(D_K), path)
    with pytest.raises(StateCorruptError, match="expected a dict with 'mom2' and 'count'"):
        load_stats_file(path)


def test_missing_keys_are_named(tmp_path):
    np.savez(tmp_path / "s.npz", mean=np.zeros(3), count=np.array(2))
    with pytest.raises(StateCorruptError, match=r"expected keys 'mom2.mom2'.*found \['count', 'mean'\]"):
        load_stats_file(tmp_path / "s.npz")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(tmp_path, bad):
    _, state = memit_state()
    state["mom2.mom2"][1, 2] = bad
    np.savez(tmp_path / "s.npz", **state)
    with pytest.raises(NumericalError, match="non-finite"):
        load_stats_file(tmp_path / "s.npz")


def test_not_square_and_bad_count(tmp_path):
    np.savez(tmp_path / "a.npz", **{"mom2.mom2": np.zeros((3, 4)), "mom2.count": np.array(5)})
    with pytest.raises(StateCorruptError, match=r"square matrix, got shape \(3, 4\)"):
        load_stats_file(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", **{"mom2.mom2": np.eye(3), "mom2.count": np.array(0)})
    with pytest.raises(StateCorruptError, match="count must be positive"):
        load_stats_file(tmp_path / "b.npz")


def test_unknown_format_missing_and_corrupt_files(tmp_path):
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="expected .npz or .pt"):
        load_stats_file(tmp_path / "s.json")
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_stats_file(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(StateCorruptError, match=r"not an .npz \(zip\) archive"):
        load_stats_file(tmp_path / "junk.npz")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(StateCorruptError, match="weights_only=True"):
        load_stats_file(tmp_path / "junk.pt")
