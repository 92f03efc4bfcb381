"""The package as users get it: a wheel, installed where no checkout and no data folder exist.

Builds the wheel from this checkout, installs it with ``--no-deps`` into a fresh virtual
environment that sees the current interpreter's packages (torch, transformers and the embedded
models come from there), and runs the README's main command and an edit from an empty working
directory with an empty ``HOME``. Nothing named ``shared`` is reachable from the wheel's files
or the working directory, so any default that points outside the installed package fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(cmd, *, cwd, env, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _build_wheel(repo_root: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(repo_root)]
    # with setuptools and wheel already here the build needs no registry at all
    if importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel"):
        cmd.insert(5, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    wheels = list(out.glob("rlsedit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory, repo_root):
    """``(bin folder, environment, empty working directory)`` of a wheel install."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(repo_root, root / "dist")
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)  # ensurepip: offline
    bindir = env_dir / "bin"
    home, work = root / "home", root / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLSEDIT_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(env_dir))
    # --ignore-installed: the development checkout's editable install of the same version is
    # visible through the system site-packages, and pip would otherwise call it satisfied
    done = subprocess.run([str(bindir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--ignore-installed", str(wheel)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert (bindir / "rlsedit").is_file(), "the wheel did not install its console script"
    return bindir, env, work


def test_wheel_holds_the_bundled_corpus_and_is_imported_from_the_venv(installed):
    bindir, env, work = installed
    code = ("import rlsedit, json; from rlsedit.locate.corpus import bundled_corpus; "
            "print(json.dumps({'pkg': rlsedit.__file__, 'corpus': str(bundled_corpus())}))")
    found = json.loads(_run([str(bindir / "python"), "-c", code], cwd=work, env=env).stdout)
    venv_root = bindir.parent.resolve()
    assert Path(found["pkg"]).resolve().is_relative_to(venv_root), found  # not the editable checkout
    corpus = Path(found["corpus"])
    assert corpus.resolve().is_relative_to(venv_root) and corpus.stat().st_size > 1_000_000
    # where the old defaults looked (four levels above a subpackage's module) holds no data
    # folder in a wheel install, nor does the working directory
    session_py = Path(found["pkg"]).parent / "session" / "session.py"
    assert not (session_py.resolve().parents[4] / "shared").exists()
    assert not (work / "shared").exists()


def test_help_demo_and_edit_run_from_a_wheel_install(installed):
    bindir, env, work = installed
    rlsedit = str(bindir / "rlsedit")
    assert "demo" in _run([rlsedit, "--help"], cwd=work, env=env).stdout

    demo = _run([rlsedit, "demo"], cwd=work, env=env).stdout
    assert "applied 4 edits" in demo, demo
    assert demo.count("    before: ") == 6 and demo.count("    after:  ") == 6, demo
    assert "edits applied: 4" in demo, demo

    edits = work / "edits.jsonl"
    edits.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"id": "b", "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    ]) + "\n")
    # the demo's statistics size, so the corpus pass it cached in HOME is reused
    hparams = work / "hparams.json"
    hparams.write_text(json.dumps({"mom2_n_samples": 20_000}))
    out = _run([rlsedit, "edit", "--state", str(work / "state"), "--edits", str(edits), "--hparams", str(hparams),
                "--batch-size", "2", "--json"], cwd=work, env=env).stdout
    report = json.loads(out)
    assert report["applied"] == 2 and report["edits_total"] == 2, report
    manifest = json.loads((work / "state" / "manifest.json").read_text())
    # the state names the bundled corpus, not a path that changes with every install
    assert manifest["meta"]["corpus"] == "bundled:enwiki_pages_2MB.jsonl", manifest["meta"]
