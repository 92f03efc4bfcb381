"""code_description: the package version, and the commit of the checkout the package is imported
from (None for an installed wheel); checked against git itself where both exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import rlsedit
from rlsedit.bench import provenance
from rlsedit.bench.provenance import code_description


def test_version_and_the_checkouts_commit():
    described = code_description()
    assert described["rlsedit"] == rlsedit.__version__
    package = Path(rlsedit.__file__).resolve().parent
    if shutil.which("git") is None:
        assert described["git_commit"] is None
        return
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=package,
                             capture_output=True, check=False).returncode == 0
    if not tracked:  # an installed wheel: no commit claimed
        assert described["git_commit"] is None and described["git_dirty"] is None
        return
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert described["git_commit"] == head and isinstance(described["git_dirty"], bool)


def test_no_git_means_no_commit(monkeypatch):
    monkeypatch.setattr(provenance, "_git", lambda *args: None)
    assert code_description() == {"rlsedit": rlsedit.__version__, "git_commit": None, "git_dirty": None}
