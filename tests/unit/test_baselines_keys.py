"""Every key/value method averages keys as MEMIT's compute_ks by default (issue 23, point 2):
the bare prompt weighs 1/2, the generated prefixes share the other 1/2; uniform is an option."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import make_lm
from rlsedit.editors import get_editor_class
from rlsedit.locate.keys import compute_keys
from rlsedit.requests import EditRequest

REQUESTS = [EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(id="b", prompt="{} plays", subject="Michael Jordan", target_new="baseball")]


def _moments(lm, n=400):
    X = torch.randn(lm.d_k, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


@pytest.mark.parametrize("method", ["rlsedit", "memit", "memit-seq", "alphaedit"])
def test_editors_average_keys_per_template_type_by_default(method):
    lm = make_lm("llama")
    cls = get_editor_class(method)
    config = cls.config_class(layers=(1, 2), context_count=3, v_num_grad_steps=2)
    assert config.key_average == "per_type"
    editor = cls(lm, config, moments=_moments(lm))
    prefixes = editor.prefixes_
    assert len(prefixes) == 4 and prefixes[0] == "{}"
    # the first layer's keys are read on the unedited model
    per = [compute_keys(lm, 1, REQUESTS, [p]) for p in prefixes]
    expected = 0.5 * per[0] + 0.5 * (per[1] + per[2] + per[3]) / 3
    uniform = sum(per) / 4
    assert float((expected - uniform).norm()) > 1e-4 * float(expected.norm())
    record = editor.propose(REQUESTS).commit()
    torch.testing.assert_close(record.tensors["layers.1.K"], expected, rtol=1e-5, atol=1e-6)


def test_uniform_key_average_stays_available():
    lm = make_lm("llama")
    cls = get_editor_class("memit")
    editor = cls(lm, cls.config_class(layers=(1, 2), context_count=3, v_num_grad_steps=2, key_average="uniform"),
                 moments=_moments(lm))
    per = [compute_keys(lm, 1, REQUESTS, [p]) for p in editor.prefixes_]
    record = editor.propose(REQUESTS).commit()
    torch.testing.assert_close(record.tensors["layers.1.K"], sum(per) / 4, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="key_average"):
        cls.config_class(key_average="mean")
