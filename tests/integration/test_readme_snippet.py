"""The README's Python example runs as written, on the real SmolLM2 (in a temporary folder)."""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.integration


def _python_blocks(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def test_the_readme_library_example_runs(repo_root, tmp_path, monkeypatch):
    blocks = [b for b in _python_blocks((repo_root / "README.md").read_text()) if "partial_fit" in b]
    assert len(blocks) == 1, "the README should hold one library example"
    monkeypatch.chdir(tmp_path)  # it writes edits/ and state/ into the working directory
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    editor = namespace["editor"]
    # what the example claims: after the undo only "jordan" is live, and the reload kept it
    assert list(editor.live_) == ["jordan"] and editor.n_edits_ == 1
    assert (tmp_path / "edits" / "editor_config.json").is_file()
    assert (tmp_path / "state" / "manifest.json").is_file()
    # the Session block is idempotent: the same edit again is "already applied"
    with namespace["Session"].open("state/") as session:
        report = session.edit([{"id": "eiffel", "prompt": "{} is in", "subject": "The Eiffel Tower",
                                "target_new": "Rome"}])
        assert report.applied == [] and report.already_applied == ["eiffel"]
