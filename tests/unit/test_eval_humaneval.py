"""HumanEval checking and the execution sandbox: right code passes, wrong or runaway code
fails, and the child cannot reach outside its directory where the kernel offers Landlock."""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

from rlsedit.eval.datafiles import EvalDataError
from rlsedit.eval.humaneval import STOP, check_completion, check_program, load_problems, truncate_completion
from rlsedit.eval.sandbox import SandboxLimits, probe_protections, run_python

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "general" / "humaneval" / "HumanEval.jsonl.gz"

PROBLEM = {
    "task_id": "Toy/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
FAST = SandboxLimits(timeout_s=5.0, cpu_seconds=3)


@pytest.fixture(scope="module")
def landlock():
    return any("landlock abi" in p for p in probe_protections())


def test_correct_and_wrong_toy_completions():
    assert check_completion(PROBLEM, PROBLEM["canonical_solution"], FAST).status == "passed"
    assert check_completion(PROBLEM, "    return a - b\n", FAST).status == "failed"
    assert check_completion(PROBLEM, "    return a +\n", FAST).status == "failed"  # syntax error


@pytest.mark.skipif(not DATA.is_file(), reason=f"HumanEval data not found at {DATA}")
def test_canonical_solutions_pass_and_broken_ones_fail():
    problems = load_problems(DATA)
    assert len(problems) == 164
    sample = problems[::8]  # 21 problems across the set
    for problem in sample:
        result = check_completion(problem, problem["canonical_solution"], FAST)
        assert result.status == "passed", (problem["task_id"], result.stderr[-400:])
        wrong = check_completion(problem, "    raise NotImplementedError\n", FAST)
        assert wrong.status == "failed", problem["task_id"]
    hashing = next(p for p in problems if p["task_id"] == "HumanEval/162")  # needs hashlib (a C extension)
    assert check_completion(hashing, hashing["canonical_solution"], FAST).passed


def test_truncation_and_program_layout():
    text = "    return a + b\n\ndef helper():\n    pass\n"
    assert truncate_completion(text) == "    return a + b\n"
    assert truncate_completion("    x = 1\n    if x:\n        return x\nprint(3)") == "    x = 1\n    if x:\n        return x"
    assert "\ndef " in STOP and "\nclass " in STOP
    program = check_program(PROBLEM, "    return a + b\n")
    assert program.startswith(PROBLEM["prompt"]) and program.rstrip().endswith("check(add)")


def test_early_exit_is_not_a_pass():
    assert check_completion(PROBLEM, "    return 0\nimport sys\nsys.exit(0)\n", FAST).status == "failed"
    assert check_completion(PROBLEM, "    return 0\nimport os\nos._exit(0)\n", FAST).status == "failed"


def test_infinite_loop_is_killed_within_the_timeout():
    start = time.monotonic()
    result = check_completion(PROBLEM, "    while True:\n        pass\n", SandboxLimits(timeout_s=3.0, cpu_seconds=2))
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 3.0 + 2.0


def test_sleeping_forever_is_killed_at_the_wall_clock_timeout():
    start = time.monotonic()
    result = run_python("import time\ntime.sleep(600)\n", SandboxLimits(timeout_s=1.5))
    assert result.status == "timeout"
    assert time.monotonic() - start < 1.5 + 2.0


def test_huge_allocation_fails_fast():
    result = check_completion(PROBLEM, "    x = bytearray(64 * 1024**3)\n    return a + b\n", FAST)
    assert result.status == "failed"
    assert "MemoryError" in result.stderr
    assert result.seconds < FAST.timeout_s


def test_environment_is_minimal_and_home_is_the_work_dir(monkeypatch):
    monkeypatch.setenv("RLSEDIT_TEST_SECRET", "hunter2")
    result = run_python(
        "import os, json\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))\n", FAST)
    assert result.passed
    seen = json.loads(result.stdout)
    assert "RLSEDIT_TEST_SECRET" not in seen["env"]
    assert set(seen["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "PYTHONHASHSEED"}
    assert seen["env"]["HOME"] == seen["cwd"] == seen["env"]["TMPDIR"]
    assert not os.path.exists(seen["cwd"])  # the work dir is removed afterwards


def test_writing_inside_the_work_dir_is_allowed():
    completion = "    open('scratch.txt', 'w').write('ok')\n    return a + b\n"
    assert check_completion(PROBLEM, completion, FAST).passed


def test_write_outside_the_work_dir(tmp_path, landlock):
    target = tmp_path / "escaped.txt"
    completion = f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n"
    result = check_completion(PROBLEM, completion, FAST)
    if not landlock:
        pytest.skip("no Landlock on this kernel: a write to a path the user may write is not prevented")
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert not target.exists()


def test_reading_outside_is_denied(tmp_path, landlock):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    result = run_python(f"print(open({str(secret)!r}).read())\n", FAST)
    if not landlock:
        pytest.skip("no Landlock on this kernel: reads are not confined")
    assert result.status == "failed" and "token" not in result.stdout


def test_tcp_connect_to_the_host_is_denied():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", FAST)
        protections = " ".join(result.protections)
        if "network namespace" not in protections and "TCP" not in protections:
            pytest.skip("neither a network namespace nor Landlock TCP rules on this kernel")
        assert result.status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_limits_are_validated_and_bad_files_rejected(tmp_path):
    with pytest.raises(EvalDataError):
        SandboxLimits(timeout_s=0)
    with pytest.raises(EvalDataError):
        SandboxLimits(memory_bytes=-1)
    with pytest.raises(EvalDataError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl.gz")
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(EvalDataError, match="test"):
        load_problems(bad)
