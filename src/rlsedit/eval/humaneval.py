"""HumanEval pass@1 with greedy completions, each checked in a contained child process.

For each problem the model continues the problem's ``prompt`` greedily; the completion is
cut at the first of :data:`STOP` (top-level code after the function: the Codex paper's stop
sequences, plus a Markdown fence for chat-tuned models). The program

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})\\n"

then runs under :func:`rlsedit.eval.sandbox.run_python` (separate process, fresh temporary
directory, resource limits, timeout, Landlock where available — see that module for what
is and is not prevented). With one greedy sample per problem, pass@1 is the share of
problems whose program passes.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any, Sequence

from .datafiles import EvalDataError, check_count, field, read_jsonl
from .sandbox import ExecutionResult, SandboxLimits, run_python
from .decoding import greedy_generate

logger = logging.getLogger(__name__)

STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n```", "\nassert ")


def load_problems(path: str | Path) -> list[dict[str, str]]:
    """HumanEval problems (``HumanEval.jsonl.gz``) with the fields the check needs."""
    problems = []
    for i, record in enumerate(read_jsonl(path, "HumanEval")):
        where = f"HumanEval record {i}"
        problems.append({key: field(record, key, str, where)
                         for key in ("task_id", "prompt", "test", "entry_point", "canonical_solution")})
    if not problems:
        raise EvalDataError(f"HumanEval file {str(path)!r} has no problems")
    return problems


def truncate_completion(text: str, stop: Sequence[str] = STOP) -> str:
    """``text`` up to the first stop sequence."""
    cut = min((pos for pos in (text.find(s) for s in stop) if pos >= 0), default=len(text))
    return text[:cut]


def check_program(problem: dict[str, str], completion: str) -> str:
    """The program that passes iff ``completion`` completes ``problem`` correctly."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check_completion(problem: dict[str, str], completion: str,
                     limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run the problem's tests on ``completion`` in the sandbox."""
    return run_python(check_program(problem, completion), limits)


def evaluate_humaneval(
    lm,
    path: str | Path,
    *,
    limit: int | None = None,
    max_new_tokens: int = 384,
    batch_size: int = 4,
    limits: SandboxLimits = SandboxLimits(),
) -> dict[str, Any]:
    """pass@1 of greedy completions on the first ``limit`` problems."""
    check_count(limit, "limit")
    problems = load_problems(path)[:limit]
    raw = greedy_generate(lm, [p["prompt"] for p in problems], max_new_tokens, stop=STOP, batch_size=batch_size)
    items = []
    protections: tuple[str, ...] = ()
    for problem, text in zip(problems, raw):
        completion = truncate_completion(text)
        result = check_completion(problem, completion, limits)
        protections = protections or result.protections
        items.append({
            "task_id": problem["task_id"],
            "passed": result.passed,
            "status": result.status,
            "seconds": result.seconds,
            "completion": completion,
            "stderr_tail": result.stderr[-500:],
        })
    if not any("landlock abi" in p for p in protections):
        logger.warning("HumanEval checks ran without Landlock: writes outside the work dir were not prevented")
    return {
        "pass@1": statistics.fmean(float(it["passed"]) for it in items),
        "n": len(items),
        "chance": 0.0,
        "chance_note": "program synthesis: no guessing baseline",
        "protections": list(protections),
        "items": items,
    }
