"""Which code produced a benchmark row: the package version and, from a git checkout, its commit.

A long benchmark spans many processes and code versions (it resumes after every stop), so each
batch's progress line names the code and machine that ran it; a write-up can then say which
batches ran at which commit without anyone having to remember. A run reads the commit once, when
it begins: HEAD may move under a process that edits for hours.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .. import __version__

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def code_description() -> dict[str, object]:
    """``{"rlsedit": version, "git_commit": 40 hex or None, "git_dirty": bool or None}``.

    The commit is that of the checkout holding the imported package (None for an installed
    wheel, or where git is missing); ``git_dirty``: files under the package differ from it.
    """
    tracked = _git("ls-files", "--error-unmatch", "__init__.py") is not None  # not a wheel inside some repo
    commit = _git("rev-parse", "HEAD") if tracked else None
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--", str(_PACKAGE_DIR))
        dirty = None if status is None else bool(status)
    return {"rlsedit": __version__, "git_commit": commit, "git_dirty": dirty}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_PACKAGE_DIR, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
