"""Running untrusted, model-written Python (HumanEval checks) in a contained child process.

This is containment for buggy or runaway code, **not** a security sandbox against an
adversary. What each run gets:

* **A separate process** (``python -I -S -B``: isolated mode, no ``site-packages``, no
  bytecode files) in a new session, started in a fresh empty directory that is deleted
  afterwards. The environment is built from scratch — ``PATH``, ``HOME`` and ``TMPDIR``
  (both the work directory), ``LANG``, ``LC_ALL``, ``PYTHONHASHSEED`` — so no variable of
  the evaluating process (tokens, credentials) is inherited. stdin is ``/dev/null``.
* **Resource limits** (``setrlimit``): address space (``RLIMIT_AS``, so a huge allocation
  raises ``MemoryError``), CPU seconds (``RLIMIT_CPU``), size of any file written
  (``RLIMIT_FSIZE``, which also caps the captured stdout/stderr files), no core dumps, and
  ``RLIMIT_NPROC`` (no new processes or threads by default). ``RLIMIT_NPROC`` is **not
  enforced for root**: a root evaluator gets no fork limit from it.
* **A wall-clock timeout**: the whole process group is killed (``SIGKILL``) when it expires,
  and once more after any exit to catch leftovers. A descendant that starts its own session
  escapes the group kill (possible only where forking is possible, i.e. as root).
* **Landlock** (Linux ≥ 5.13, unprivileged), where the kernel offers it: writes, file
  creation, deletion and renames are allowed only below the work directory; reads and
  execution only below the Python installation and the system library directories (so the
  project, the home directory and ``/etc`` are unreadable); with Landlock ABI ≥ 4 TCP
  bind/connect are denied; with ABI ≥ 6 signals to processes outside the sandbox (such as
  the evaluator) and abstract unix sockets are denied.
* **A network namespace** (unprivileged user + network namespace) where the kernel allows
  it: no interface but a downed loopback, so UDP is cut too.

Each result lists the protections the child actually applied (``protections``); without
Landlock, a write to any path the evaluating user may write (say ``/tmp/x``) is *not*
prevented — only its size is capped. The limits are set by a bootstrap script inside the
child, before the untrusted code runs, rather than by ``subprocess``'s ``preexec_fn``,
which is unsafe in a multi-threaded parent such as a torch process.

A run passes when the program finishes with exit status 0 *and* the bootstrap wrote its
completion marker after the program's last statement: ``sys.exit()`` before the checks is
a failure. A program that calls ``os._exit(0)`` also fails (no marker). Code that inspects
the bootstrap's frames could forge the marker — again, not a defence against an adversary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .datafiles import EvalDataError

logger = logging.getLogger(__name__)

_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_SYSTEM_LIBS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
                "/usr/share/zoneinfo", "/etc/localtime", "/dev/urandom")
_OUTPUT_LIMIT = 64 * 1024  # characters of stdout/stderr kept in a result


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. ``None`` leaves a resource limit unset."""

    timeout_s: float = 10.0
    cpu_seconds: int | None = 10
    memory_bytes: int | None = 2 * 1024**3
    file_bytes: int | None = 4 * 1024**2
    max_processes: int | None = 0
    isolate_network: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise EvalDataError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        for name in ("cpu_seconds", "memory_bytes", "file_bytes", "max_processes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise EvalDataError(f"{name} must be a non-negative integer or None, got {value!r}")


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one run: ``status`` is ``"passed"``, ``"failed"`` or ``"timeout"``."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    protections: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def read_paths() -> list[str]:
    """Directories and files the child may read: the Python installation and system libraries."""
    paths = {sys.base_prefix, sys.base_exec_prefix, os.path.realpath(sys.base_prefix)}
    for key in ("stdlib", "platstdlib"):
        value = sysconfig.get_paths().get(key)
        if value:
            paths.add(value)
            paths.add(os.path.realpath(value))
    paths.update(p for p in _SYSTEM_LIBS if os.path.exists(p))
    return sorted(p for p in paths if p and os.path.exists(p))


def _read_capped(path: Path) -> str:
    with open(path, "rb") as handle:
        data = handle.read(_OUTPUT_LIMIT)
    return data.decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``source`` as a Python program under the containment described in the module docstring."""
    base = Path(tempfile.mkdtemp(prefix="rlsedit-exec-"))
    work = base / "work"
    work.mkdir(mode=0o700)
    (work / "program.py").write_text(source, encoding="utf-8")
    report_r, report_w = os.pipe()
    result_r, result_w = os.pipe()
    config = {
        "work": str(work),
        "program": "program.py",
        "read_paths": read_paths(),
        "isolate_network": limits.isolate_network,
        "report_fd": report_w,
        "result_fd": result_w,
        "limits": {
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "max_processes": limits.max_processes,
        },
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}
    status = "failed"
    start = time.monotonic()
    try:
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", _CHILD, json.dumps(config)],
                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, pass_fds=(report_w, result_w), close_fds=True,
            )
            os.close(report_w)
            os.close(result_w)
            report_w = result_w = -1
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                returncode = proc.wait()
                status = "timeout"
            finally:
                _kill_group(proc.pid)  # leftovers in the group, if any
        seconds = time.monotonic() - start
        with os.fdopen(report_r, "rb") as handle:
            report_r = -1
            raw_report = handle.read(_OUTPUT_LIMIT)
        with os.fdopen(result_r, "rb") as handle:
            result_r = -1
            marker = handle.read(64)
        try:
            protections = tuple(json.loads(raw_report.decode("utf-8"))) if raw_report else ()
        except (UnicodeDecodeError, json.JSONDecodeError):
            protections = ()
        if status != "timeout":
            cpu_killed = returncode in (-signal.SIGXCPU, -signal.SIGKILL) and limits.cpu_seconds is not None
            if returncode == 0 and marker == b"completed":
                status = "passed"
            elif cpu_killed and seconds < limits.timeout_s and not marker:
                status = "timeout"  # the CPU-time limit ended it
        return ExecutionResult(status=status, returncode=returncode, seconds=seconds,
                               stdout=_read_capped(base / "stdout"), stderr=_read_capped(base / "stderr"),
                               protections=protections)
    finally:
        for fd in (report_r, report_w, result_r, result_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        shutil.rmtree(base, ignore_errors=True)


def probe_protections() -> tuple[str, ...]:
    """The protections a trivial run gets on this machine (for reports and tests)."""
    return run_python("pass\n", SandboxLimits(timeout_s=30.0)).protections
