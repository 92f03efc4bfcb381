"""A tiny on-disk world for session-level reliability tests: a random Llama saved as a local
Hugging Face directory (a valid ``--model`` spec), a small corpus for ``E[kkᵀ]``, an
hparams file and edit files, plus helpers to run the ``rlsedit`` command in a subprocess.

Not a test module: ``tests/reliability/test_session_*.py`` import it. Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import rlsedit
from tiny_models import SENTENCES, bpe_tokenizer, one_thread, save, tiny_model

__all__ = ["one_thread"]  # autouse fixture, re-exported for the test modules that import it

# Small and fast: two edited layers, few corpus tokens, few target steps, one context prefix.
HPARAMS = {"layers": [1, 2], "mom2_n_samples": 2000, "v_num_grad_steps": 5, "context_count": 1,
           "context_length": 5}

MAX_POSITIONS = 128  # the tiny model's context: a prompt longer than this must be refused

SUBJECTS = ["Paris", "Madrid", "Chicago", "Sweden", "France", "Rome", "Toko", "Danielle", "Michael",
            "Jordan", "Eiffel", "Yasuda", "Darrieux", "Spain", "Tower", "University", "Autonomous"]
TARGETS = ["guitar", "piano", "French", "basketball", "baseball", "capital", "city", "mother"]
TEMPLATES = ["{} is located in", "The mother tongue of {} is", "{} plays the", "{} speaks"]


def save_tiny_llama(directory: Path, *, seed: int = 0) -> Path:
    """A random 4-layer Llama (d_model 32, d_k 64) and its byte-level BPE tokenizer trained on
    :data:`SENTENCES` (any text tokenizes: bytes are the alphabet), saved with save_pretrained."""
    tokenizer = bpe_tokenizer()
    # sharper logits than the random init (head_std): the target objective has work to do
    model = tiny_model("llama", vocab=len(tokenizer), seed=seed, n_layers=4, max_positions=MAX_POSITIONS, head_std=0.5,
                       tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=0,
                       pad_token_id=2)
    return save(directory, model, tokenizer)


def edit_records(n: int, *, start: int = 0) -> list[dict]:
    """``n`` distinct, valid edit records with ids ``e<start>`` …"""
    out = []
    for i in range(start, start + n):
        subject = f"{SUBJECTS[i % len(SUBJECTS)]} {i}"
        out.append({"id": f"e{i}", "prompt": TEMPLATES[i % len(TEMPLATES)], "subject": subject,
                    "target_new": TARGETS[(3 * i + 1) % len(TARGETS)]})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class TinyWorld:
    """Paths of one tiny world (built once per test module; read-only for the tests)."""

    root: Path
    model: Path
    corpus: Path
    hparams: Path
    cache: Path

    def edit_args(self, state: Path, edits: Path, *extra: str, batch_size: int = 1) -> list[str]:
        return ["edit", "--state", str(state), "--edits", str(edits), "--model", str(self.model),
                "--corpus", str(self.corpus), "--hparams", str(self.hparams), "--cache-dir", str(self.cache),
                "--batch-size", str(batch_size), *extra]

    def status_args(self, state: Path) -> list[str]:
        return ["status", "--state", str(state), "--json", "--cache-dir", str(self.cache)]


def build_world(root: Path) -> TinyWorld:
    model = save_tiny_llama(root / "model")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s + " " + s.lower()}) + "\n" for s in SENTENCES * 20))
    hparams = root / "hparams.json"
    hparams.write_text(json.dumps(HPARAMS))
    return TinyWorld(root=root, model=model, corpus=corpus, hparams=hparams, cache=root / "cache")


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment for a child ``rlsedit``: this very source tree first on the path."""
    src = str(Path(rlsedit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def rlsedit_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlsedit", *args]


def run_rlsedit(args: list[str], *, timeout: float = 300, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run ``rlsedit ARGS`` to completion; returns the CompletedProcess (never raises on rc)."""
    return subprocess.run(rlsedit_command(args), capture_output=True, text=True, env=child_env(threads),
                          timeout=timeout)


def status_json(world: TinyWorld, state: Path) -> dict:
    done = run_rlsedit(world.status_args(state))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def cli(args: list[str]) -> tuple[int, str, str]:
    """Run ``rlsedit ARGS`` in this process (the real ``main``): exit code, stdout, stderr."""
    from rlsedit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse refusing the arguments
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def cli_status(world: TinyWorld, state: Path) -> dict:
    code, out, err = cli(world.status_args(state))
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """The CLI refused with an error's exit code (3-10, see rlsedit.errors) and one
    ``rlsedit: error:`` line (the last) holding ``needles``."""
    assert 3 <= code <= 10, (code, err)
    assert "Traceback" not in err, err
    # other stderr lines can only be progress bars of transformers' weight loading
    errors = [line for line in err.splitlines() if line.startswith("rlsedit: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def state_files(state: Path) -> dict[str, bytes]:
    """Every file of a state directory but the lock (which only names its last holder)."""
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def journal_seqs(state: Path) -> int:
    """Committed journal entry files (temp files excluded): what a killed writer left."""
    journal = state / "journal"
    if not journal.is_dir():
        return 0
    return sum(1 for p in journal.iterdir() if p.name.endswith(".safetensors") and p.name[:1].isdigit())


def tiny_runtime(world: TinyWorld):
    from rlsedit.session.session import Runtime

    return Runtime(corpus=str(world.corpus), cache_dir=str(world.cache))


def tiny_config(**changes):
    from rlsedit.editors import RLSEditConfig

    return RLSEditConfig.from_dict({**HPARAMS, **changes})


def make_state(world: TinyWorld, state: Path, records: list[dict], *, batch_size: int = 2,
               journal_only: int = 2) -> None:
    """A state holding ``records``: all but the last ``journal_only`` under a snapshot, those
    last ones only in the journal (as a crash leaves them), so opening it replays them."""
    from rlsedit.requests import parse_request
    from rlsedit.session.session import Session

    requests = [parse_request(r, i) for i, r in enumerate(records)]
    head, tail = requests[:len(requests) - journal_only], requests[len(requests) - journal_only:]
    with Session.create(state, model=str(world.model), config=tiny_config(), runtime=tiny_runtime(world)) as s:
        s.edit(head, batch_size=batch_size)
    if tail:
        session = Session.open(state, runtime=tiny_runtime(world))
        session.edit(tail, batch_size=1)
        session.close(snapshot=False)
