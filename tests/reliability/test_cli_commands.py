"""The user-facing commands on a tiny model: demo, ask, status, export (full and delta-only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from session_tiny import build_world, cli, edit_records, one_thread, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def state(world, tmp_path_factory):
    state = tmp_path_factory.mktemp("cmd") / "state"
    edits = write_jsonl(tmp_path_factory.mktemp("edits") / "e.jsonl", edit_records(3))
    code, _, err = cli(world.edit_args(state, edits, batch_size=3))
    assert code == 0, err
    return state


def test_ask_prints_a_completion_and_five_probabilities(world, state):
    code, out, err = cli(["ask", "--state", str(state), "--cache-dir", str(world.cache), "--json",
                          "--max-new-tokens", "3", "The", "Eiffel", "Tower", "is"])
    assert code == 0, err
    answer = json.loads(out)
    assert answer["prompt"] == "The Eiffel Tower is" and isinstance(answer["completion"], str)
    probs = [t["prob"] for t in answer["top5"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_ask_refuses_an_empty_prompt(world, state):
    code, _, err = cli(["ask", "--state", str(state), "--cache-dir", str(world.cache), " "])
    assert code == 3 and "prompt is empty" in err  # invalid input


def test_export_full_and_delta_only(world, state, tmp_path):
    from transformers import AutoModelForCausalLM

    code, _, err = cli(["export", "--state", str(state), "--cache-dir", str(world.cache), "--out", str(tmp_path / "full")])
    assert code == 0, err
    code, _, err = cli(["export", "--state", str(state), "--cache-dir", str(world.cache), "--out",
                        str(tmp_path / "delta"), "--delta-only"])
    assert code == 0, err
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(world.model, dtype=torch.float32).state_dict()
    delta = load_file(str(tmp_path / "delta" / "delta.safetensors"))
    assert delta, "the delta file holds no tensors"
    for name, d in delta.items():  # base + delta = exported edited weights, layer by layer
        assert torch.allclose(base[name] + d, edited[name], atol=1e-6)
        assert d.abs().max() > 0
    untouched = [n for n in base if n not in delta]
    assert all(torch.equal(base[n], edited[n]) for n in untouched if "lm_head" not in n)
    code, _, err = cli(["export", "--state", str(state), "--cache-dir", str(world.cache), "--out", str(tmp_path / "full")])
    assert code == 3 and "not empty" in err  # never overwrites


def test_demo_runs_end_to_end_on_a_given_model(world, tmp_path):
    code, out, err = cli(["demo", "--model", str(world.model), "--corpus", str(world.corpus),
                          "--cache-dir", str(world.cache), "--state", str(tmp_path / "demo")])
    assert code == 0, err
    assert out.count("before:") == out.count("after:") == 6 and "edits applied: 4" in out
