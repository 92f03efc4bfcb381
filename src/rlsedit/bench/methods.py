"""The method benchmark: every editor on the same stream of CounterFact edits.

What one run does (``rlsedit bench methods``, or plain ``rlsedit bench --model …``):

1. **Edits.** The first ``n`` records of the data file, in file order (``shuffle=True``:
   those ``n`` records in a seeded random order). Every method gets the same sequence,
   cut into consecutive batches of ``batch_size``.
2. **Unedited reference.** The base model is scored once on the same edits and general
   suites (row ``unedited``): what editing starts from. Methods run as separate processes
   on one ``out`` share it: the first scores it under a lock on ``out``, the others wait.
3. **Per method**, on a freshly loaded model (each method's
   :class:`~rlsedit.session.session.Session` loads the model itself; before the first batch
   the weights' sha256 is checked against the base model's, so nothing leaks between
   methods): the batches are applied through the session (journaled, so a killed run
   resumes mid-method), and after each batch the bench records

   * timings — ``total_s`` (the whole batch: validation, targets, keys, solve, journal),
     ``solve_s`` (the method's closed-form solve, summed over layers; ``None`` for FT, which
     has none), ``journal_s`` (durable write) and ``locate_s = total − solve − journal``
     (value targets and keys);
   * diagnostics — per layer ``drift_fro = ‖W − W_0‖_F`` and
     ``anchor_residual = ‖K_0ᵀ(W − W_0)‖_F = sqrt(n · tr(Dᵀ E[kkᵀ] D))`` (RQ4);
   * at ``checkpoints`` evenly spaced batches (always the last): CounterFact efficacy /
     generalization / specificity on the edits applied so far and the chosen general suites.

   After the last batch: the forgetting curve (:func:`rlsedit.eval.retention.forgetting_curve`)
   and, on the first ``fluency_n`` edits, fluency and consistency (these generate text,
   the slowest part of the evaluation).
4. **Shared work.** The key second moments ``E[kkᵀ]`` come from
   :func:`rlsedit.locate.stats.second_moments`, cached on disk: the first method computes
   them, the others read the cache (or wait for it, when they run at the same time).
   Context prefixes are seeded, so every method computes the same ones from its unedited
   model.

Resumability (files under ``out``): ``settings.json`` pins the edit stream (ids) and
everything that changes results; ``<method>/state`` is the session; ``<method>/progress.jsonl``
holds one line per finished batch (timings, diagnostics, checkpoint scores);
``<method>/result.json`` is written atomically when the method is done. A rerun skips
finished methods, reopens a half-finished one from its journal and continues with the
next batch (batch granularity: a batch that was journaled but whose progress line was
lost keeps its edits; its timings are recorded as ``None``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InvalidRequestError, StateMismatchError
from ..requests import EditRequest, read_requests
from ..filelock import StateLock

log = logging.getLogger(__name__)

DEFAULT_METHODS: tuple[str, ...] = ("rlsedit", "rlsedit-official", "alphaedit", "memit", "rome", "ft")
# short names of the sweepable hyperparameters (--sweep lambda=…;mu=…) -> config field
SWEEP_ALIASES = {"lambda": "lambda_reg", "lam": "lambda_reg", "mu": "mu_reg", "n": "mom2_update_weight"}
SWEEP_METHOD = "rlsedit"
SETTINGS_FILE = "settings.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
UNEDITED = "unedited"
GEN_CHAT = {"auto": None, "yes": True, "no": False}  # gen_chat -> GenerationConfig.chat


@dataclass(frozen=True)
class MethodBenchConfig:
    """What ``rlsedit bench methods`` runs. Every field has a default and help."""

    model: str = field(default="smollm2", metadata={"help": "model spec (smollm2, gemma3-270m, a directory, a .gguf)"})
    data: str = field(default="", metadata={"help": "edit file (CounterFact, any layout read_requests accepts)"})
    methods: tuple[str, ...] = field(default=DEFAULT_METHODS, metadata={"help": "methods, in the order run"})
    n: int = field(default=200, metadata={"help": "number of edits (the first N records of the file)"})
    batch_size: int = field(default=20, metadata={"help": "edits per batch"})
    checkpoints: int = field(default=4, metadata={"help": "evaluations along the stream (the last batch is always one)"})
    general: tuple[str, ...] = field(default=(), metadata={"help": "general suites at each checkpoint (ppl, knowns, mmlu, sst2, gsm8k, …)"})
    general_n: int | None = field(default=100, metadata={"help": "items per scored-choice suite (seeded sample; None = all)"})
    gsm8k_limit: int | None = field(default=10, metadata={"help": "GSM8K/HumanEval problems per checkpoint"})
    ppl_tokens: int = field(default=5_000, metadata={"help": "WikiText-2 tokens for perplexity"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "generation cap for GSM8K/HumanEval (None: their defaults)"})
    fluency_n: int = field(default=0, metadata={"help": "edits scored for fluency and consistency at the end (0 = skip)"})
    retention_bins: int = field(default=10, metadata={"help": "bins of the forgetting curve"})
    seed: int = field(default=0, metadata={"help": "seed: edit order (with shuffle), general-suite samples, sampling"})
    shuffle: bool = field(default=False, metadata={"help": "seeded shuffle of the first N records instead of file order"})
    hparams_dir: str | None = field(default=None, metadata={"help": "folder of <method>.json hyperparameter files (ours or official)"})
    sweep: str | None = field(default=None, metadata={"help": "RLSEdit grid, e.g. 'lambda=0,0.1;mu=0.5,1,2' or 'layers=3-7,4-8' (each point is a run)"})
    mom2_tokens: int | None = field(default=None, metadata={"help": "corpus tokens for E[kkᵀ] (overrides every method's mom2_n_samples)"})
    corpus: str | None = field(default=None, metadata={"help": "corpus for E[kkᵀ] (default: the session's default corpus)"})
    data_dir: str | None = field(default=None, metadata={"help": "folder of the general suites' files (../shared/data)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    cache_dir: str | None = field(default=None, metadata={"help": "model/statistics cache (default ~/.cache/rlsedit)"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per forward pass in evaluation"})
    gen_n: int = field(default=200, metadata={
        "help": "generation metrics on a seeded sample of this many edits (all when fewer; 0 = skip)"})
    gen_max_new_tokens: int = field(default=12, metadata={"help": "token cap of each generated continuation"})
    gen_chat: str = field(default="auto", metadata={
        "help": "ask through the chat template: auto (when the model has one), yes (error without one), no"})

    def __post_init__(self) -> None:
        for name in ("n", "batch_size", "checkpoints", "ppl_tokens", "retention_bins", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        for name in ("general_n", "gsm8k_limit", "mom2_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise InvalidRequestError(f"{name} must be a positive integer or None, got {value!r}")
        if self.fluency_n < 0:
            raise InvalidRequestError(f"fluency_n must be >= 0, got {self.fluency_n!r}")
        if isinstance(self.gen_n, bool) or not isinstance(self.gen_n, int) or self.gen_n < 0:
            raise InvalidRequestError(f"gen_n must be an integer >= 0, got {self.gen_n!r}")
        if isinstance(self.gen_max_new_tokens, bool) or not isinstance(self.gen_max_new_tokens, int) \
                or self.gen_max_new_tokens <= 0:
            raise InvalidRequestError(f"gen_max_new_tokens must be a positive integer, got {self.gen_max_new_tokens!r}")
        if self.gen_chat not in GEN_CHAT:
            raise InvalidRequestError(f"gen_chat must be one of {', '.join(GEN_CHAT)}, got {self.gen_chat!r}")
        if not self.methods:
            raise InvalidRequestError("methods: name at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise InvalidRequestError(f"methods: a method is named twice in {list(self.methods)}")
        if self.general and self.data_dir is None:
            raise InvalidRequestError("general suites need data_dir (the folder laid out like ../shared/data)")


# ---- pieces ----------------------------------------------------------------------------------

def parse_sweep(text: str | None) -> list[dict[str, float | tuple[int, ...]]]:
    """``'lambda=0,0.1;mu=0.5,1'`` → the grid ``[{lambda_reg: 0, mu_reg: 0.5}, …]`` (product, in order).

    Keys are RLSEdit config fields or the aliases ``lambda``/``lam``/``mu``/``n``; values are
    finite floats, except for ``layers``, whose values are bands ``4-8`` or lists ``4+6+8``.
    """
    if text is None or not text.strip():
        return []
    from ..editors.config import RLSEditConfig

    fields = {f.name for f in dataclasses.fields(RLSEditConfig)}
    axes: list[tuple[str, list[float | tuple[int, ...]]]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise InvalidRequestError(f"sweep: expected NAME=v1,v2 in {part!r}")
        key, values_text = part.split("=", 1)
        key = SWEEP_ALIASES.get(key.strip(), key.strip())
        if key not in fields:
            raise InvalidRequestError(f"sweep: {key!r} is not an RLSEdit hyperparameter")
        if any(key == k for k, _ in axes):
            raise InvalidRequestError(f"sweep: {key!r} is given twice")
        texts = [v.strip() for v in values_text.split(",") if v.strip()]
        if not texts:
            raise InvalidRequestError(f"sweep: {part!r} has no values")
        axes.append((key, [_sweep_layers(v, part) if key == "layers" else _sweep_number(v, part) for v in texts]))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def _sweep_number(text: str, part: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequestError(f"sweep: {part!r} has a value that is not a number") from None
    if not math.isfinite(value):
        raise InvalidRequestError(f"sweep: {part!r} needs finite numbers")
    return value


def _sweep_layers(text: str, part: str) -> tuple[int, ...]:
    """``4-8`` → (4, 5, 6, 7, 8); ``4+6+8`` → (4, 6, 8)."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            layers = tuple(range(first, last + 1))
        else:
            layers = tuple(int(x) for x in text.split("+"))
    except ValueError:
        raise InvalidRequestError(f"sweep: {part!r}: layers are a band like 4-8 or a list like 4+6+8") from None
    if not layers or any(x < 0 for x in layers) or list(layers) != sorted(set(layers)):
        raise InvalidRequestError(f"sweep: {part!r}: {text!r} is not an ascending set of layers")
    return layers


def sweep_value_text(value: Any) -> str:
    """A swept setting as text: layers as a band ``4-8`` or a list ``4+6+8``, floats by ``:g``."""
    if isinstance(value, (list, tuple)):
        if len(value) > 1 and list(value) == list(range(value[0], value[-1] + 1)):
            return f"{value[0]}-{value[-1]}"
        return "+".join(str(x) for x in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_run_name(point: dict[str, float | tuple[int, ...]]) -> str:
    """``rlsedit[lambda_reg=0.1,mu_reg=1]`` — the name a sweep point's run is reported under."""
    return f"{SWEEP_METHOD}[" + ",".join(f"{k}={sweep_value_text(v)}" for k, v in point.items()) + "]"


def run_dir_name(run_name: str) -> str:
    """A file-system-safe folder name for a run (``rlsedit[mu_reg=1]`` → ``rlsedit_mu_reg-1``)."""
    out = run_name.replace("[", "_").replace("]", "").replace("=", "-").replace(",", "_")
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in out)


def checkpoint_batches(n_batches: int, checkpoints: int) -> list[int]:
    """The batch counts after which to evaluate: ``checkpoints`` evenly spaced, always the last.

    ``checkpoint_batches(10, 4) == [3, 5, 8, 10]`` (``round(n·j/k)`` for ``j = 1..k``, deduplicated).
    """
    if n_batches <= 0 or checkpoints <= 0:
        raise InvalidRequestError(f"need positive batches and checkpoints, got {n_batches}, {checkpoints}")
    k = min(checkpoints, n_batches)
    return sorted({max(1, round(n_batches * j / k)) for j in range(1, k + 1)})


def select_edits(path: str | Path, n: int, *, shuffle: bool = False, seed: int = 0) -> list[EditRequest]:
    """The first ``n`` records of ``path`` (file order), or those records in a seeded random order."""
    requests = read_requests(path, limit=n)
    if len(requests) < n:
        raise InvalidRequestError(f"{path} holds {len(requests)} records, fewer than n={n}")
    if shuffle:
        random.Random(seed).shuffle(requests)
    return requests


def edit_stream_sha256(requests: Sequence[EditRequest]) -> str:
    """Identifies the edit stream (ids and contents, in order) for resume checks."""
    digest = hashlib.sha256()
    for r in requests:
        digest.update(json.dumps(r.to_record(), sort_keys=True).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class MethodRun:
    """One run of the benchmark: a registered method with its (possibly swept) config."""

    name: str
    method: str
    config: Any

    @property
    def dir_name(self) -> str:
        return run_dir_name(self.name)


def plan_runs(config: MethodBenchConfig) -> list[MethodRun]:
    """Resolve methods, hyperparameter files and the sweep into the runs to make, in order."""
    from ..editors import get_editor_class

    def base_config(method: str):
        cls = get_editor_class(method).config_class
        cfg = cls()
        if config.hparams_dir is not None:
            path = Path(config.hparams_dir) / f"{method}.json"
            if path.is_file():
                cfg = cls.from_json_file(path)
            else:
                log.info("no %s; %s uses its defaults", path, method)
        if config.mom2_tokens is not None:
            cfg = cfg.replace(mom2_n_samples=config.mom2_tokens)
        return cfg

    runs = [MethodRun(m, m, base_config(m)) for m in config.methods]
    for point in parse_sweep(config.sweep):
        try:
            cfg = base_config(SWEEP_METHOD).replace(**point)
        except ValueError as exc:
            raise InvalidRequestError(f"sweep point {point}: {exc}") from None
        name = sweep_run_name(point)
        if name not in {r.name for r in runs}:
            runs.append(MethodRun(name, SWEEP_METHOD, cfg))
    return runs


# ---- small file helpers --------------------------------------------------------------------

def _unedited_once(out: Path, score: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The unedited row, scored by one process and read by every other.

    Methods of one benchmark may run as separate processes on the same ``out`` (that is how
    a long stream uses several cores); the first to arrive scores the base model while it
    holds the lock on ``out``, the others wait for it and read ``unedited.json`` instead of
    repeating the scoring (ten minutes for 1,000 CounterFact edits on a CPU).
    """
    path = out / f"{UNEDITED}.json"
    with StateLock(out, wait=True):
        if path.is_file():
            return json.loads(path.read_text())
        unedited = score()
        _write_json(path, unedited)
        return unedited


def _write_json(path: Path, obj: Any) -> None:
    from ..session.atomic import atomic_write_json

    atomic_write_json(path, obj)


def _read_progress(path: Path) -> list[dict[str, Any]]:
    """Lines of a progress file; a torn last line (a crash mid-write) is dropped."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line", path)
                break
            raise StateMismatchError(f"{path} line {i + 1} is not JSON; delete the run's folder to redo it") from None
    return out


def _append_progress(path: Path, record: dict[str, Any]) -> None:
    import os

    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---- evaluation pieces ---------------------------------------------------------------------

def _evaluate(lm, requests: Sequence[EditRequest], config: MethodBenchConfig, general: Sequence[str],
              plan: _GenerationPlan | None = None) -> dict[str, Any]:
    from ..eval.runner import run_eval

    out = run_eval(lm, counterfact=list(requests), general=tuple(general), data_dir=config.data_dir,
                   n=config.general_n, limit=config.gsm8k_limit, ppl_tokens=config.ppl_tokens,
                   batch_size=config.eval_batch_size, seed=config.seed, max_new_tokens=config.max_new_tokens)
    if plan is not None:
        generation = _evaluate_generation(lm, requests, plan, config.retention_bins)
        if generation is not None:
            out["generation"] = generation
    return out


@dataclass(frozen=True)
class _GenerationPlan:
    """Which edits the generation metrics score and how: a seeded sample of stream positions,
    fixed for the whole run so every checkpoint and every method scores the same edits (those
    applied so far), and the unedited model's neighbourhood continuations (``pre_edit``)."""

    positions: tuple[int, ...]
    config: Any  # rlsedit.eval.generation.GenerationConfig
    pre_edit: dict[str, str] | None = None


def _generation_plan(config: MethodBenchConfig, requests: Sequence[EditRequest]) -> _GenerationPlan | None:
    if not config.gen_n:
        return None
    from ..eval.generation import GenerationConfig, paraphrase_kind_of_file, sample_positions

    gen = GenerationConfig(max_new_tokens=config.gen_max_new_tokens, seed=config.seed,
                           paraphrase_kind=paraphrase_kind_of_file(config.data), chat=GEN_CHAT[config.gen_chat],
                           batch_size=config.eval_batch_size)
    return _GenerationPlan(tuple(sample_positions(len(requests), config.gen_n, config.seed)), gen)


def _evaluate_generation(lm, applied: Sequence[EditRequest], plan: _GenerationPlan, n_bins: int) -> dict[str, Any] | None:
    """Generation metrics of the sampled edits among ``applied`` (``None`` when none is), with
    the edit prompt's *begins with* binned by stream position (the generation forgetting curve)."""
    from ..eval.generation import evaluate_generation
    from ..eval.retention import bin_by_position

    chosen = [p for p in plan.positions if p < len(applied)]
    if not chosen:
        return None
    start = time.perf_counter()
    result = evaluate_generation(lm, [applied[p] for p in chosen], plan.config, pre_edit=plan.pre_edit)
    said: list[bool | None] = [None] * len(applied)
    for rec in result["records"]:
        said[chosen[rec["position"]]] = rec["edit"]["new_begins"]
    out = {k: v for k, v in result.items() if k != "records"}
    out["bins"] = {"edit_begins": bin_by_position(said, n_bins)}
    out["seconds"] = time.perf_counter() - start
    return out


def _final_extras(lm, requests: Sequence[EditRequest], config: MethodBenchConfig, consistency_ref) -> dict[str, Any]:
    """Forgetting curve over the whole stream, and fluency/consistency on the first ``fluency_n`` edits."""
    from ..eval.counterfact import evaluate_counterfact
    from ..eval.retention import forgetting_curve

    start = time.perf_counter()
    curve = forgetting_curve(lm, requests, n_bins=config.retention_bins, batch_size=config.eval_batch_size)
    out: dict[str, Any] = {"retention": {"bins": curve["bins"], "chance": curve["chance"]}}
    out["retention_seconds"] = time.perf_counter() - start
    if config.fluency_n:
        start = time.perf_counter()
        subset = list(requests[:config.fluency_n])
        gen = evaluate_counterfact(lm, subset, batch_size=config.eval_batch_size, fluency=True,
                                   consistency=consistency_ref, seed=config.seed)
        summary = gen["summary"]
        out["generation"] = {
            "edits": len(subset),
            "fluency": summary.get("fluency"),
            "consistency": summary.get("consistency"),
            "notes": gen["notes"],
        }
        out["generation_seconds"] = time.perf_counter() - start
    return out


def _consistency_reference(config: MethodBenchConfig, requests: Sequence[EditRequest]):
    if not config.fluency_n or config.data_dir is None:
        return None
    from ..eval.consistency import ConsistencyReference
    from ..eval.runner import DATA_FILES

    path = Path(config.data_dir) / DATA_FILES["corpus"]
    if not path.is_file():
        log.warning("no consistency reference corpus at %s; consistency is skipped", path)
        return None
    return ConsistencyReference.from_corpus(path, [r.target_new for r in requests[:config.fluency_n]])


def _diagnostics_summary(per_layer: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-layer diagnostics plus totals over layers (root of the sum of squares)."""
    drift = [d["drift_fro"] for d in per_layer.values() if d.get("drift_fro") is not None]
    anchor = [d["anchor_residual"] for d in per_layer.values() if d.get("anchor_residual") is not None]
    return {
        "layers": per_layer,
        "drift_fro": math.sqrt(sum(x * x for x in drift)) if drift else None,
        "anchor_residual": math.sqrt(sum(x * x for x in anchor)) if anchor else None,
    }


class _PhaseTimer:
    """Adds up the wall time of the editor's ``_solve`` and the journal's ``append`` calls.

    Installed as instance attributes on this run's own editor and store, so nothing global
    changes; :meth:`take` returns and resets the sums.
    """

    def __init__(self, editor, store) -> None:
        self.solve_s = 0.0
        self.solve_calls = 0
        self.journal_s = 0.0
        self._wrap(editor, "_solve", "solve")
        self._wrap(store, "append", "journal")

    def _wrap(self, obj, attr: str, phase: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if phase == "solve":
                    self.solve_s += elapsed
                    self.solve_calls += 1
                else:
                    self.journal_s += elapsed

        setattr(obj, attr, timed)

    def take(self) -> tuple[float | None, float]:
        solve = self.solve_s if self.solve_calls else None
        journal = self.journal_s
        self.solve_s, self.solve_calls, self.journal_s = 0.0, 0, 0.0
        return solve, journal


# ---- the benchmark -------------------------------------------------------------------------

def _settings(config: MethodBenchConfig, requests: Sequence[EditRequest], general: Sequence[str]) -> dict[str, Any]:
    keys = ("model", "data", "n", "batch_size", "checkpoints", "general_n", "gsm8k_limit", "ppl_tokens",
            "max_new_tokens", "fluency_n", "retention_bins", "seed", "shuffle", "mom2_tokens", "corpus", "device",
            "gen_n", "gen_max_new_tokens", "gen_chat")
    out = {k: getattr(config, k) for k in keys}
    out["general"] = list(general)
    out["edit_ids"] = [r.id for r in requests]
    out["edit_stream_sha256"] = edit_stream_sha256(requests)
    return out


# settings that may differ between a run and its resumption without changing any figure
_RESUME_FREE = {"device"}


def _check_or_write_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if k not in _RESUME_FREE and old.get(k) != settings.get(k))
        if diff:
            raise StateMismatchError(
                f"{out} holds a benchmark made with other settings ({', '.join(diff)}); "
                "use a new --out folder or delete the old one")
        return
    _write_json(path, settings)


def run_method_bench(config: MethodBenchConfig, out: str | Path, *, progress: bool = False,
                     on_method_done: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out``; returns the full results dict (also in
    ``out/results.json``, with ``results.md`` and PNG plots beside it)."""
    from ..session.session import Runtime
    from .solver import machine_description

    import torch

    if not config.data:
        raise InvalidRequestError("data: pass the edit file (e.g. ../shared/data/counterfact/counterfact-train.json)")
    from ..eval.runner import general_suite_names

    general = general_suite_names(config.general)
    runs = plan_runs(config)  # checks methods, hparams files and the sweep before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    requests = select_edits(config.data, config.n, shuffle=config.shuffle, seed=config.seed)
    _check_or_write_settings(out, _settings(config, requests, general))
    runtime = Runtime(device=config.device, progress=progress, cache_dir=config.cache_dir,
                      corpus=config.corpus)
    consistency_ref = None
    if config.fluency_n:
        consistency_ref = _consistency_reference(config, requests)

    unedited = _unedited_once(out, lambda: _run_unedited(config, requests, general, consistency_ref))
    base_sha = unedited["weights_sha256"]
    plan = _generation_plan(config, requests)
    if plan is not None:
        plan = dataclasses.replace(plan, pre_edit=unedited.get("generation_pre_edit"))

    results: dict[str, Any] = {}
    for run in runs:
        result_path = out / run.dir_name / "result.json"
        if result_path.is_file():
            log.info("%s: already done (%s)", run.name, result_path)
            results[run.name] = json.loads(result_path.read_text())
            continue
        results[run.name] = _run_one(run, config, requests, general, out / run.dir_name, runtime, base_sha,
                                     consistency_ref, plan)
        _write_json(result_path, results[run.name])
        if on_method_done is not None:
            on_method_done(run.name, results[run.name])
    machine = machine_description(torch.device(config.device)) | {"torch_threads": torch.get_num_threads()}
    return write_report(out, [r.name for r in runs], machine=machine)


NOTES = [
    "edits: the first n records of the data file in file order (settings.shuffle: a seeded shuffle of them); "
    "the same sequence and batches for every method",
    "efficacy/generalization/specificity: ROME success rates (NLL comparison; chance 0.5) on the edits "
    "applied so far; *_acc: teacher-forced top-1 accuracy (chance 1/V)",
    "timings: total_s per batch includes validation, value targets, keys, solve and the journal write; "
    "solve_s is the closed-form solve summed over layers (None for FT)",
    "generation columns (settings.gen_n: a seeded sample of the edits, the same for every method and checkpoint): "
    "greedy decoding to '.', a newline or EOS, at most settings.gen_max_new_tokens tokens, SQuAD-normalised; "
    "says it = the continuation begins with the new object; mentions (rephrase) = the new object occurs in the "
    "continuation of an open rephrase prompt (MEND layout); still says old = begins with the old object; neighbour "
    "gen unchanged = the neighbourhood prompt's continuation is identical to the unedited model's (the unedited row: "
    "two decodings of the same model, a determinism check); chat says it = the chat-template answer to the edit "
    "prompt mentions the new object (– where the model has no chat template)",
]


def write_report(out: str | Path, run_names: Sequence[str] | None = None, *,
                 machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gather ``out``'s finished runs into ``results.json``, ``results.md`` and plots.

    ``run_names`` orders the rows (a name without ``result.json`` is reported as not run);
    ``None`` takes every run folder found. Also what ``--report-only`` does for a run that
    was stopped before all methods finished.
    """
    from .plots import plot_method_bench

    out = Path(out)
    if not (out / SETTINGS_FILE).is_file() or not (out / f"{UNEDITED}.json").is_file():
        raise InvalidRequestError(f"{out} holds no benchmark yet (no {SETTINGS_FILE} / {UNEDITED}.json)")
    results: dict[str, Any] = {}
    if run_names is None:
        run_names = sorted(p.parent.name for p in out.glob("*/result.json"))
    for name in run_names:
        path = out / run_dir_name(name) / "result.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    if machine is None:
        machines = [r["machine"] for r in results.values() if "machine" in r]
        machine = machines[0] if machines else {"note": "not recorded"}
    full = {
        "settings": json.loads((out / SETTINGS_FILE).read_text()),
        "runs": list(run_names),
        "unedited": json.loads((out / f"{UNEDITED}.json").read_text()),
        "methods": results,
        "machine": machine,
        "notes": list(NOTES),
    }
    _write_json(out / RESULTS_JSON, full)
    (out / RESULTS_MD).write_text(format_results_markdown(full), encoding="utf-8")
    plots = plot_method_bench(full, out)
    log.info("plots: %s", ", ".join(str(p) for p in plots))
    return full


def _run_unedited(config, requests, general, consistency_ref) -> dict[str, Any]:
    from ..eval.generation import pre_edit_generations
    from ..model.load import load_model
    from ..model.weights import weights_sha256

    start = time.perf_counter()
    lm = load_model(config.model, device=config.device, cache_dir=config.cache_dir)
    sha = weights_sha256(lm)
    plan = _generation_plan(config, requests)
    pre_edit = None
    if plan is not None:
        # the methods' "neighbour gen unchanged" compares against these; this row's own figure
        # compares two decodings of the same model in other batches (a determinism check)
        pre_edit = pre_edit_generations(lm, [requests[p] for p in plan.positions], plan.config)
        plan = dataclasses.replace(plan, pre_edit=pre_edit)
    evaluation = _evaluate(lm, requests, config, general, plan)
    extras = _final_extras(lm, requests, config, consistency_ref)
    return {"weights_sha256": sha, "model_fingerprint": lm.fingerprint, "evaluation": evaluation,
            "final": extras, "generation_pre_edit": pre_edit, "seconds": time.perf_counter() - start}


def _run_one(run: MethodRun, config: MethodBenchConfig, requests: list[EditRequest], general, folder: Path,
             runtime, base_sha: str, consistency_ref, plan: _GenerationPlan | None = None) -> dict[str, Any]:
    from ..model.weights import weights_sha256
    from ..session.session import Session
    from ..session.store import is_state_dir

    folder.mkdir(parents=True, exist_ok=True)
    state_dir = folder / "state"
    progress_path = folder / "progress.jsonl"
    if state_dir.exists() and not is_state_dir(state_dir):
        # a crash while the session was being created: nothing in it was acknowledged
        log.warning("%s: removing an unfinished state folder %s", run.name, state_dir)
        shutil.rmtree(state_dir)
    records = _read_progress(progress_path)
    start_wall = time.perf_counter()
    setup_start = time.perf_counter()
    session = Session.open_or_create(state_dir, model=config.model, method=run.method, config=run.config,
                                     runtime=runtime)
    setup_s = time.perf_counter() - setup_start
    try:
        if session.store.meta["config"] != run.config.to_dict():
            raise StateMismatchError(f"{state_dir} holds another configuration of {run.method}; delete it to redo")
        if not session.index:
            sha = weights_sha256(session.lm)
            if sha != base_sha:
                raise StateMismatchError(
                    f"{run.name}: the freshly loaded model's weights ({sha[:12]}…) differ from the base model's "
                    f"({base_sha[:12]}…); refusing to benchmark on changed weights")
        timer = _PhaseTimer(session.editor, session.store)
        batches = [requests[i:i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
        checkpoints = set(checkpoint_batches(len(batches), config.checkpoints))
        # a progress line counts only if its batch is in the journal (a state folder lost or
        # deleted while progress.jsonl stayed must not make the run skip unapplied batches)
        kept = [rec for rec in records
                if 1 <= rec["batch"] <= len(batches) and all(r.id in session.index for r in batches[rec["batch"] - 1])]
        if len(kept) != len(records):
            log.warning("%s: %d progress lines have no journaled batch; redoing those batches",
                        run.name, len(records) - len(kept))
            from ..session.atomic import atomic_write_bytes

            atomic_write_bytes(progress_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
            records = kept
        done = {rec["batch"] for rec in records}
        for b, batch in enumerate(batches, start=1):
            if b in done:
                continue
            applied_before = all(r.id in session.index for r in batch)
            start = time.perf_counter()
            if not applied_before:
                report = session.edit(batch, batch_size=len(batch))
                if len(report.applied) != len(batch):
                    raise StateMismatchError(f"{run.name}: batch {b} applied {len(report.applied)} of {len(batch)} edits")
            total = time.perf_counter() - start
            solve_s, journal_s = timer.take()
            record: dict[str, Any] = {"batch": b, "edits": b * config.batch_size if b < len(batches) else len(requests)}
            if applied_before:  # journaled before a crash; its timings were lost
                record.update(total_s=None, solve_s=None, journal_s=None, locate_s=None, resumed=True)
            else:
                record.update(total_s=total, solve_s=solve_s, journal_s=journal_s,
                              locate_s=total - (solve_s or 0.0) - journal_s)
            record["diagnostics"] = _diagnostics_summary(session.editor.diagnostics())
            if b in checkpoints:
                so_far = [r for bb in batches[:b] for r in bb]
                record["evaluation"] = _evaluate(session.lm, so_far, config, general, plan)
            _append_progress(progress_path, record)
            records.append(record)
            log.info("%s: batch %d/%d (%.1f s)", run.name, b, len(batches), total)
        final = _final_extras(session.lm, requests, config, consistency_ref)
        status = {"weights_sha256": weights_sha256(session.lm), "layers": list(session.editor.layers),
                  "edits_applied": len(session.index)}
    finally:
        session.close()
    records.sort(key=lambda r: r["batch"])
    timed = [r for r in records if r.get("total_s") is not None]
    n_timed = sum(len(batches[r["batch"] - 1]) for r in timed)
    solve = [r["solve_s"] for r in timed if r.get("solve_s") is not None]
    from .solver import machine_description

    import torch

    return {
        "method": run.method,
        "machine": machine_description(torch.device(config.device)) | {"torch_threads": torch.get_num_threads()},
        "config": run.config.to_dict(),
        "batches": records,
        "final": final,
        "status": status,
        "seconds_per_edit": sum(r["total_s"] for r in timed) / n_timed if n_timed else None,
        "solve_seconds_per_batch": statistics.fmean(solve) if solve else None,
        "setup_seconds_last_open": setup_s,
        "wall_seconds_this_process": time.perf_counter() - start_wall,
    }


# ---- reporting -----------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _final_eval(result: dict[str, Any]) -> dict[str, Any]:
    """The evaluation at the last checkpoint of a method (the end of the stream)."""
    evals = [b["evaluation"] for b in result["batches"] if "evaluation" in b]
    return evals[-1] if evals else {}


def _general_cell(name: str, res: dict[str, Any] | None) -> str:
    if not res:
        return "–"
    if name == "wikitext":
        return _num(res.get("ppl"), "{:.1f}")
    for key in ("acc", "recall", "pass@1"):
        if key in res and isinstance(res[key], (int, float)):
            return _pct(res[key])
    return "–"


def _general_chance(name: str, res: dict[str, Any] | None) -> str:
    if not res or res.get("chance") is None:
        return "–"
    return _num(res["chance"], "{:.0f}") if name == "wikitext" else _pct(res["chance"])


def _retention_oldest(final: dict[str, Any]) -> float | None:
    bins = final.get("retention", {}).get("bins", {}).get("success", [])
    return bins[0]["mean"] if bins else None


def _generation_oldest(generation: dict[str, Any]) -> float | None:
    bins = generation.get("bins", {}).get("edit_begins", [])
    return bins[0]["mean"] if bins else None


def _generation_sample_lines(full: dict[str, Any]) -> list[str]:
    """Each row's generation samples (end of the stream), so a reader can check the scorer."""
    from ..eval.generation import format_samples

    evaluations = []
    if full.get("unedited"):
        evaluations.append((UNEDITED, full["unedited"]["evaluation"]))
    evaluations += [(name, _final_eval(full["methods"][name])) for name in full["runs"] if name in full["methods"]]
    lines: list[str] = []
    for name, evaluation in evaluations:
        samples = evaluation.get("generation", {}).get("samples")
        if samples:
            if not lines:
                lines += ["", "## Generation samples (end of the stream; to check the scorer by eye)"]
            lines += ["", f"### {name}", "", *format_samples(samples)]
    return lines


def format_results_markdown(full: dict[str, Any]) -> str:
    """The paper's table (Efficacy / Generalization / Specificity / Fluency / Consistency),
    plus retention, general capability, cost, and a chance row."""
    settings = full["settings"]
    general = settings.get("general", [])
    from ..eval.generation import COLUMNS as GEN_COLUMNS

    head = ["Method", "Eff.↑", "Gen.↑", "Spe.↑", "Flu.↑", "Consis.↑", "Ret. oldest↑",
            *[label for _, label in GEN_COLUMNS], "gen. ret. oldest", *[
                ("PPL↓" if g == "wikitext" else f"{g}↑") for g in general], "s/edit", "solve s/batch"]
    lines = [
        f"# Method benchmark: {settings['model']}, {Path(settings['data']).name}, "
        f"N={settings['n']}, batch {settings['batch_size']}",
        "",
        "CounterFact success rates in % at the end of the stream, on all edits applied "
        "(efficacy = rewrite prompt, generalization = paraphrases, specificity = neighborhood prompts). "
        "Ret. oldest: efficacy of the oldest 1/"
        f"{settings.get('retention_bins', 10)} of the edits after the whole stream. "
        "s/edit: wall seconds per edit (targets, keys, solve, journal); solve s/batch: the closed-form "
        "solve alone, mean per batch. Generation columns (beside the teacher-forced ones, see the notes): "
        "% of the sampled edits' generated continuations; gen. ret. oldest: says it (edit) on the oldest "
        f"1/{settings.get('retention_bins', 10)} of the sampled edits after the whole stream.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]

    def row(name: str, evaluation: dict, final: dict, s_edit, solve) -> str:
        summary = evaluation.get("counterfact", {}).get("summary", {})
        gen = final.get("generation", {})
        said = evaluation.get("generation", {})
        general_res = evaluation.get("general", {})
        cells = [name, _pct(summary.get("efficacy")), _pct(summary.get("generalization")),
                 _pct(summary.get("specificity")), _num(gen.get("fluency"), "{:.2f}"),
                 _num(gen.get("consistency"), "{:.3f}"), _pct(_retention_oldest(final)),
                 *[_pct(said.get("summary", {}).get(key)) for key, _ in GEN_COLUMNS],
                 _pct(_generation_oldest(said)),
                 *[_general_cell(g, general_res.get(g)) for g in general],
                 _num(s_edit, "{:.2f}"), _num(solve, "{:.3f}")]
        return "| " + " | ".join(cells) + " |"

    unedited = full.get("unedited")
    if unedited:
        lines.append(row(f"{UNEDITED} (before editing)", unedited["evaluation"], unedited["final"], None, None))
    for name in full["runs"]:
        result = full["methods"].get(name)
        if result is None:
            lines.append("| " + " | ".join([name] + ["not run"] + ["–"] * (len(head) - 2)) + " |")
            continue
        lines.append(row(name, _final_eval(result), result["final"], result["seconds_per_edit"],
                         result["solve_seconds_per_batch"]))
    ref = unedited["evaluation"] if unedited else {}
    chance = ["chance", "50.0", "50.0", "50.0", "–", "–", "50.0", *["–"] * (len(GEN_COLUMNS) + 1),
              *[_general_chance(g, ref.get("general", {}).get(g)) for g in general], "", ""]
    lines.append("| " + " | ".join(chance) + " |")
    lines += ["", "## Along the stream", "",
              "| Method | edits | Eff. | Gen. | Spe. | says it (edit) | says it (para.) / mentions (reph.) | "
              "nbr gen unchanged | chat says it | ‖W−W0‖ | anchor residual | s/edit (batch) | solve s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in full["runs"]:
        result = full["methods"].get(name)
        if result is None:
            continue
        for b in result["batches"]:
            if "evaluation" not in b:
                continue
            s = b["evaluation"].get("counterfact", {}).get("summary", {})
            size = b["edits"] - (result["batches"][b["batch"] - 2]["edits"] if b["batch"] > 1 else 0)
            per_edit = None if b.get("total_s") is None else b["total_s"] / size
            d = b["diagnostics"]
            g = b["evaluation"].get("generation", {}).get("summary", {})
            para = g.get("paraphrase_begins") if g.get("paraphrase_begins") is not None else g.get("open_mentions")
            lines.append(f"| {name} | {b['edits']} | {_pct(s.get('efficacy'))} | {_pct(s.get('generalization'))} | "
                         f"{_pct(s.get('specificity'))} | {_pct(g.get('edit_begins'))} | {_pct(para)} | "
                         f"{_pct(g.get('neighbour_unchanged'))} | {_pct(g.get('chat_mentions'))} | "
                         f"{_num(d.get('drift_fro'), '{:.3g}')} | "
                         f"{_num(d.get('anchor_residual'), '{:.3g}')} | {_num(per_edit)} | "
                         f"{_num(b.get('solve_s'), '{:.3f}')} |")
    lines += _generation_sample_lines(full)
    machine = full.get("machine", {})
    lines += ["", f"Machine: {json.dumps(machine, sort_keys=True)}", ""]
    lines += [f"- {note}" for note in full.get("notes", [])]
    return "\n".join(lines) + "\n"
