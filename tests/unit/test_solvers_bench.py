"""The solver benchmark runs end to end on tiny sizes, and ``bench`` is an extensible group."""

from __future__ import annotations

import argparse
import json

import pytest

from rlsedit.bench import get_bench_subparsers
from rlsedit.bench.solver import SolverBenchConfig, format_markdown_table, plot_solver_bench, run_solver_bench
from rlsedit.cli import main
from rlsedit.errors import InvalidRequestError

TINY = dict(dks=(32,), dvs=(8,), us=(1, 4), histories=(5, 60), repeats=2, drive_chunk=25)


def test_tiny_run_reports_every_field_and_an_exact_recursion(tmp_path):
    result = run_solver_bench(SolverBenchConfig(**TINY))
    assert [(row["d_k"], row["u"]) for row in result["rows"]] == [(32, 1), (32, 4)]
    for row in result["rows"]:
        for key in ("ratio_t60_over_t5", "update_gflops", "gemm_gflops", "gemm_fraction", "memit_seq_s"):
            assert row[key] > 0.0
        assert set(row["t_update_s"]) == {"5", "60"}
        assert row["gemm_fraction"] == pytest.approx(row["update_gflops"] / row["gemm_gflops"])
    assert result["rows"][0]["gemm_fraction_ok"] is None  # the target applies from u = 100
    assert result["max_rel_err_vs_oneshot"] < 1e-10
    assert result["max_rel_err_vs_oneshot_float32"] < 1e-3
    assert "| 32 | 8 | 4 |" in format_markdown_table(result)
    path = tmp_path / "solver.png"
    plot_solver_bench(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_json(capsys):
    code = main(["bench", "solver", "--dk", "16", "--dv", "4", "--u", "2", "--history", "0,30",
                 "--repeats", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"][0]["d_k"] == 16 and "ratio_t30_over_t0" in result["rows"][0]


def test_cli_refuses_bad_arguments(capsys):
    assert main(["bench", "solver", "--dk", "100", "--repeats", "1"]) == 3  # invalid input: no default d_v
    assert "no default d_v" in capsys.readouterr().err
    with pytest.raises(InvalidRequestError, match="histories"):
        SolverBenchConfig(histories=(100, 10))


def test_bench_group_is_created_once_and_extensible():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    first = get_bench_subparsers(sub)
    first.add_parser("solver").set_defaults(which="solver")
    second = get_bench_subparsers(sub)
    assert second is first
    second.add_parser("speed").set_defaults(which="speed")
    assert parser.parse_args(["bench", "speed"]).which == "speed"
    assert parser.parse_args(["bench", "solver"]).which == "solver"
