"""``rlsedit stats`` on a tiny model saved as a local Hugging Face directory."""

from __future__ import annotations

import json

import pytest

from rlsedit.cli import main
from rlsedit.errors import InvalidRequestError
from rlsedit.locate.stats_cli import parse_layers
from tiny_models import save, tiny_model, word_tokenizer

WORDS = "the a of is in and to capital city river king queen paris rome france italy".split()


@pytest.fixture
def model_dir(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    model = tiny_model("llama", vocab=len(tokenizer), seed=0, d_model=16, d_mlp=24, n_layers=3, n_heads=2,
                       n_kv_heads=1, max_positions=64)
    return save(tmp_path / "tiny", model, tokenizer)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) for i in range(5)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return path


def test_json_output_then_cache_hit(model_dir, corpus, tmp_path, capsys):
    argv = ["stats", "--model", str(model_dir), "--corpus", str(corpus), "--layers", "0,2",
            "--max-tokens", "60", "--seq-len", "16", "--batch-tokens", "64",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in first["layers"]] == [0, 2]
    for row in first["layers"]:
        assert row["count"] == 60 and not row["cached"] and row["trace"] > 0
        assert 1 <= row["rank"] <= 24 and row["path"].endswith(".safetensors")
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(row["cached"] for row in second["layers"])
    assert [r["trace"] for r in second["layers"]] == [r["trace"] for r in first["layers"]]


def test_table_output(model_dir, corpus, tmp_path, capsys):
    assert main(["stats", "--model", str(model_dir), "--corpus", str(corpus), "--layers", "1-2",
                 "--max-tokens", "40", "--seq-len", "16", "--no-cache"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["layer", "tokens", "trace", "rank", "condition", "cached", "seconds"]
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[1] == "40" and r[5] == "no" for r in rows)
    assert not (tmp_path / "cache").exists()


def test_errors_exit_3_with_one_line(model_dir, corpus, tmp_path, capsys):
    assert main(["stats", "--model", str(model_dir), "--corpus", str(corpus), "--layers", "7",
                 "--no-cache"]) == 3
    err = capsys.readouterr().err.splitlines()  # transformers' loading bar may come first
    assert err[-1] == "rlsedit: error: layer 7 is not a block index of this model (0..2)"
    assert main(["stats", "--model", str(model_dir), "--corpus", str(tmp_path / "none.jsonl"),
                 "--layers", "0", "--no-cache"]) == 3
    assert "does not exist" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("3,4,5") == [3, 4, 5]
    assert parse_layers("3-5, 8") == [3, 4, 5, 8]
    for bad in ("", "a,b", "3-x"):
        with pytest.raises(InvalidRequestError):
            parse_layers(bad)
