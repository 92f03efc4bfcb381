"""Speed of the edit stream (``rlsedit bench speed``).

One run answers four questions about editing a model through a real session (journal and
snapshots included):

1. **Seconds per edit**, split into the phases of a batch (``Editor._compute_batch`` times
   them into each journal entry's ``info.seconds``): ``targets`` (value-target optimisation),
   ``keys`` (keys and the current top-layer state, per edited layer), ``solve`` (absolute
   targets, the method's closed form, the weight write) and ``bookkeeping`` (everything
   else of the batch's wall time: validation, the journal append, snapshots).
2. **Flat in history**: seconds per edit over the first and the last tenth of the stream's
   batches, and their ratio, for the total and for every phase.
3. **Speedup over the reference**: the first ``reference_n`` edits again, in the same batches,
   from the unedited weights, with targets from the straightforward per-request loop
   (:func:`~rlsedit.locate.targets_reference.compute_targets_reference`) — same objective, same keys,
   same solve — and the ratio of the two paths' seconds per edit on those edits.
4. **Quality at that speed**: efficacy (ROME's ``p(new) > p(true)`` on the edit prompt, and
   top-1 of the new object) of those first edits right after them, on both paths; and of all
   ``n`` edits at the end of the stream.

Peak resident memory is read after the stream (before the reference run) and set beside the
model's and the editor state's sizes.

With several ``targets`` (value-target methods, ``EditConfig.v_method``: the Adam loop,
``onestep``, ``verify``; :mod:`rlsedit.locate.fasttargets`) the whole stream runs once per
method, in one process, on the same edits from the unedited weights, and the report sets the
methods side by side: seconds per edit by phase, Adam steps per edit, the teacher-forced
efficacy, generalization and specificity of all ``n`` edits after the stream, the generation
metrics (:mod:`rlsedit.eval.generation`) of a seeded sample of them, and the peak RSS of each
stream (the kernel's high-water mark is reset before each where Linux allows it). The
per-request reference runs once, after the first method's stream.
"""

from __future__ import annotations

import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..editors import get_editor_class
from ..editors.base import iter_batches
from ..editors.config import PRESETS, preset_overrides
from ..errors import InvalidRequestError
from ..requests import EditRequest
from .edit_stream import select_edits
from ..model.device import synchronize

log = logging.getLogger(__name__)

PHASES = ("targets", "keys", "solve", "bookkeeping")


@dataclass
class SpeedBenchConfig:
    data: str = field(metadata={"help": "edit file (CounterFact / zsRE / ours)"})
    model: str = field(default="smollm2", metadata={"help": "model spec (embedded name, path, .gguf)"})
    method: str = field(default="rlsedit", metadata={"help": "editing method"})
    n: int = field(default=1000, metadata={"help": "edits in the stream (the first n records of the file)"})
    batch_size: int = field(default=20, metadata={"help": "edits per batch"})
    reference_n: int = field(default=40, metadata={
        "help": "the first edits also run through the per-request reference path (0 = skip it)"})
    hparams: str | None = field(default=None, metadata={"help": "the method's hyperparameters JSON (default: its defaults)"})
    corpus: str | None = field(default=None, metadata={"help": "corpus for E[kkᵀ] (default: the session's)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache for models and E[kkᵀ]"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's choice)"})
    state_dir: str | None = field(default=None, metadata={
        "help": "where the session state goes (default: a temporary folder, removed after)"})
    targets: tuple[str, ...] = field(default=(), metadata={
        "help": "value-target methods to compare, each a whole stream on the same edits (adam, onestep, verify, "
                "a label of ``variants``, or a preset such as ``fast``; default: the method's configured one)"})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "named settings to compare as targets: label -> overrides of the method's config (e.g. "
                "{\"fast\": {\"v_early_stop_nll\": 0.5, \"v_dtype\": \"bfloat16\"}})"})
    gen_n: int = field(default=0, metadata={
        "help": "generation metrics (eval/generation.py) on a seeded sample of this many edits after each stream "
                "(0 = skip)"})

    def __post_init__(self) -> None:
        from ..locate.target_config import TARGET_METHODS

        targets = tuple(self.targets)
        if not isinstance(self.variants, dict) or not all(
                isinstance(k, str) and k and isinstance(v, dict) for k, v in self.variants.items()):
            raise InvalidRequestError(f"variants must map labels to dicts of config overrides, got {self.variants!r}")
        clash = sorted(set(self.variants) & set(TARGET_METHODS))
        if clash:
            raise InvalidRequestError(f"variant labels {clash} are value-target method names; choose other labels")
        known = [*TARGET_METHODS, *self.variants, *(p for p in PRESETS if p not in self.variants)]
        bad = [t for t in targets if t not in known]
        if bad or len(set(targets)) != len(targets):
            raise InvalidRequestError(f"targets must be distinct names among {known}, got {list(targets)}")
        unused = sorted(set(self.variants) - set(targets))
        if unused:
            raise InvalidRequestError(f"variants {unused} are not among the targets {list(targets)}")
        self.targets = targets
        if isinstance(self.gen_n, bool) or not isinstance(self.gen_n, int) or self.gen_n < 0:
            raise InvalidRequestError(f"gen_n must be an integer >= 0, got {self.gen_n!r}")
        for name, low in (("n", 1), ("batch_size", 1), ("reference_n", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.reference_n > self.n:
            raise InvalidRequestError(f"reference_n ({self.reference_n}) cannot exceed n ({self.n})")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InvalidRequestError(f"threads must be an integer >= 1, got {self.threads!r}")


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory line in MiB (Linux; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _peak_rss_mb() -> float:
    """The process's peak resident memory since start, or since :func:`_reset_peak_rss`."""
    high_water = _status_mb("VmHWM")
    if high_water is not None:
        return high_water
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0, ``clear_refs`` value 5), so
    each stream of a comparison reports its own peak; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _current_rss_mb() -> float | None:
    """Resident memory now (Linux ``/proc``; None elsewhere): logged per batch to see growth."""
    return _status_mb("VmRSS")


def _peak_device_mb(device: torch.device) -> float | None:
    """Most memory the CUDA caching allocator held for tensors at once (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _tensor_mb(tensors) -> float:
    """MiB of the distinct memory behind ``tensors`` (a storage shared by several counts once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()) / 2**20


def _editor_state_mb(editor) -> float:
    """MiB the editor holds beyond the model (:meth:`~rlsedit.editors.base.Editor.held_tensors`)."""
    return _tensor_mb(editor.held_tensors().values())


def efficacy(lm, requests: Sequence[EditRequest]) -> dict[str, float]:
    """ROME's efficacy (``p(new) > p(true)`` on the edit prompt) and top-1 of the new object."""
    from ..eval.counterfact import score_requests

    records = score_requests(lm, requests, groups=("rewrite",))
    return {"success": statistics.fmean(r["rewrite_success"] for r in records),
            "top1": statistics.fmean(r["rewrite_acc"] for r in records)}


def quality(lm, requests: Sequence[EditRequest]) -> dict[str, float | None]:
    """Teacher-forced CounterFact efficacy, generalization and specificity (ROME's success
    rates: the new object more likely than the true one on the edit prompt and its
    paraphrases, the true one more likely on the neighbourhood prompts) of ``requests``."""
    from ..eval.counterfact import score_requests, summarize

    summary = summarize(score_requests(lm, requests))
    return {k: summary.get(k) for k in ("efficacy", "generalization", "specificity", "efficacy_acc")}


def _batch_row(edits_done: int, size: int, wall: float, info: dict[str, Any]) -> dict[str, Any]:
    phases = {k: float(v) for k, v in info.get("seconds", {}).items()}
    row = {"edits_done": edits_done, "size": size, "seconds": wall,
           **{p: phases.get(p, 0.0) for p in PHASES if p != "bookkeeping"},
           "bookkeeping": max(0.0, wall - sum(phases.values()))}
    steps = info.get("target_steps") or []
    row["target_steps"] = [int(x) for x in steps]
    row["target_steps_mean"] = statistics.fmean(steps) if steps else None
    return row


def _per_edit(rows: Sequence[dict[str, Any]], key: str = "seconds") -> float:
    return sum(r[key] for r in rows) / max(1, sum(r["size"] for r in rows))


def history_check(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per edit (total and per phase) over the first and last tenth of the batches
    (at least one batch each) and the ratio last/first.

    Bookkeeping is also given without the batches that wrote a periodic snapshot
    (``bookkeeping_between_snapshots``; a snapshot costs the same whenever it happens, but
    one landing in only one of the two tenths would read as growth), and the snapshots' own
    cost first and last (``snapshot_bookkeeping_seconds``).
    """
    k = max(1, len(rows) // 10)
    first, last = rows[:k], rows[-k:]
    out: dict[str, Any] = {"batches_each": k}
    for key in ("seconds", *PHASES):
        a, b = _per_edit(first, key), _per_edit(last, key)
        name = "total" if key == "seconds" else key
        out[name] = {"first": a, "last": b, "ratio": (b / a) if a > 0 else None}
    a = [r["target_steps_mean"] for r in first if r.get("target_steps_mean") is not None]
    b = [r["target_steps_mean"] for r in last if r.get("target_steps_mean") is not None]
    if a and b:
        out["target_steps"] = {"first": statistics.fmean(a), "last": statistics.fmean(b),
                               "ratio": statistics.fmean(b) / statistics.fmean(a) if statistics.fmean(a) > 0 else None}
    plain_first = [r for r in first if not r.get("snapshot")]
    plain_last = [r for r in last if not r.get("snapshot")]
    if plain_first and plain_last:
        a, b = _per_edit(plain_first, "bookkeeping"), _per_edit(plain_last, "bookkeeping")
        out["bookkeeping_between_snapshots"] = {"first": a, "last": b, "ratio": (b / a) if a > 0 else None}
    snaps = [r["bookkeeping"] for r in rows if r.get("snapshot")]
    if snaps:
        out["snapshot_bookkeeping_seconds"] = {"first": snaps[0], "last": snaps[-1], "count": len(snaps)}
    return out


def run_speed_bench(config: SpeedBenchConfig, *, progress: bool = False) -> dict[str, Any]:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    requests = select_edits(config.data, config.n)
    if len(requests) < config.n:
        raise InvalidRequestError(f"{config.data} holds {len(requests)} records, fewer than n = {config.n}")
    editor_cls = get_editor_class(config.method)
    method_config = editor_cls.config_class.from_json_file(config.hparams) if config.hparams else None
    base = method_config or editor_cls.config_class()
    configs = {}
    for target in config.targets:   # every variant checked before any stream runs
        try:
            configs[target] = base.replace(**target_overrides(config, target))
        except TypeError as exc:
            raise InvalidRequestError(f"variant {target!r}: {exc}; its keys must be fields of the "
                                      f"{config.method} config") from None
    if len(config.targets) <= 1:
        if config.targets:
            method_config = configs[config.targets[0]]
        return _stream_run(config, requests, method_config, reference=True, progress=progress)
    runs = {}
    for i, target in enumerate(config.targets):
        log.info("bench speed: stream %d of %d, value targets by %r", i + 1, len(config.targets), target)
        runs[target] = _stream_run(config, requests, configs[target],
                                   reference=i == 0, progress=progress, label=target)
    first = runs[config.targets[0]]
    return {"settings": first["settings"], "n": config.n, "targets": list(config.targets), "by_target": runs}


def target_overrides(config: SpeedBenchConfig, target: str) -> dict[str, Any]:
    """The method-config fields a compared target sets: a variant's overrides, a preset's
    (:data:`~rlsedit.editors.config.PRESETS`, unless a variant takes its name), or just
    ``v_method`` for a value-target method's name."""
    if target in config.variants:
        return dict(config.variants[target])
    if target in PRESETS:
        return preset_overrides(target)
    return {"v_method": target}


def _stream_run(config: SpeedBenchConfig, requests: list[EditRequest], method_config, *, reference: bool,
                progress: bool, label: str | None = None) -> dict[str, Any]:
    """One whole stream through a fresh session (and the reference run when asked): the
    report of :func:`run_speed_bench` for one method configuration."""
    from tqdm.auto import tqdm

    from ..session.session import Runtime, Session

    batches = list(iter_batches(requests, config.batch_size))
    runtime = Runtime(device=config.device, cache_dir=config.cache_dir, corpus=config.corpus)
    editor_cls = get_editor_class(config.method)
    peak_reset = _reset_peak_rss()

    with tempfile.TemporaryDirectory(prefix="rlsedit-speed-") as tmp:
        state_dir = Path(config.state_dir) if config.state_dir else Path(tmp) / "state"
        if label is not None:
            state_dir = state_dir / label
        start = time.perf_counter()
        session = Session.create(state_dir, model=config.model, method=config.method, config=method_config,
                                 runtime=runtime)
        create_s = time.perf_counter() - start
        rss_after_create = _peak_rss_mb()
        try:
            lm, editor = session.lm, session.editor
            generation = _GenerationCheck(lm, requests, config) if config.gen_n else None   # unedited model
            rows: list[dict[str, Any]] = []
            checkpoint: dict[str, float] | None = None
            done = 0
            for batch in tqdm(batches, disable=not progress, desc="stream", unit="batch"):
                snapshots_before = session.store.snapshot_covers_seq
                synchronize(config.device)
                t = time.perf_counter()
                session.edit(batch, batch_size=config.batch_size)
                synchronize(config.device)
                wall = time.perf_counter() - t
                done += len(batch)
                info = session.store.read_entry(session.store.journal_count - 1).meta.get("info", {})
                rows.append(_batch_row(done, len(batch), wall, info))
                # a periodic snapshot (every Runtime.snapshot_every batches) lands in this batch's
                # bookkeeping; the history check sets those batches apart
                rows[-1]["snapshot"] = session.store.snapshot_covers_seq != snapshots_before
                rows[-1]["rss_mb"] = _current_rss_mb()
                if reference and config.reference_n and checkpoint is None and done >= config.reference_n:
                    checkpoint = efficacy(lm, requests[:done])  # not timed
            peak_rss = _peak_rss_mb()
            peak_device = _peak_device_mb(torch.device(config.device))
            final = efficacy(lm, requests)
            quality_all = quality(lm, requests)
            generation_all = None if generation is None else generation.after(lm)
            model_mb = _tensor_mb([*lm.model.parameters(), *lm.model.buffers()])
            state_mb = _editor_state_mb(editor)
            config_used = editor.config
            floor = _floor(lm, editor, batches, rows, config.device)
            moments, prefixes = editor.moments, editor.prefixes_
            editor.reset()  # unedited weights for the reference run
        finally:
            session.close(snapshot=False)

    result: dict[str, Any] = {
        "settings": {**asdict(config), "torch": torch.__version__, "python": platform.python_version(),
                     "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                     "layers": list(editor.layers), "prefixes": len(prefixes),
                     "gpu": torch.cuda.get_device_name(config.device) if torch.device(config.device).type == "cuda"
                     else None},
        "create_seconds": create_s,
        "n": config.n,
        "target_method": getattr(config_used, "v_method", "adam"),
        "target_steps_per_edit": _steps_per_edit(rows),
        "peak_rss_is_this_stream": peak_reset,
        "quality_all": quality_all,
        "generation": generation_all,
        "seconds_per_edit": _per_edit(rows),
        "phases_per_edit": {p: _per_edit(rows, p) for p in PHASES},
        "edits_per_minute": 60.0 / _per_edit(rows),
        "history": history_check(rows),
        "peak_rss_mb": peak_rss,
        "peak_rss_after_create_mb": rss_after_create,
        "peak_device_mb": peak_device,
        "model_mb": model_mb,
        "state_mb": state_mb,
        "rss_budget_mb": model_mb + state_mb + 1024.0,
        "floor": floor,
        "seconds_per_edit_over_floor": _per_edit(rows) / floor["floor_seconds_per_edit_total"],
        "efficacy_all": final["success"],
        "efficacy_all_top1": final["top1"],
        "batches": rows,
    }
    if reference and config.reference_n:
        covered = [r for r in rows if r["edits_done"] <= _covering(rows, config.reference_n)]
        fast_first = _per_edit(covered)
        ref_requests = requests[:covered[-1]["edits_done"]]
        ref_editor = editor_cls(lm, config_used, moments=moments, prefixes=prefixes,
                                                     targets="reference")
        ref_rows = []
        done = 0
        for batch in tqdm(list(iter_batches(ref_requests, config.batch_size)), disable=not progress,
                          desc="reference", unit="batch"):
            synchronize(config.device)
            t = time.perf_counter()
            proposal = ref_editor.propose(batch)
            proposal.commit()
            synchronize(config.device)
            done += len(batch)
            ref_rows.append(_batch_row(done, len(batch), time.perf_counter() - t, proposal.record.info))
        ref_eff = efficacy(lm, ref_requests)
        ref_editor.reset()
        result.update({
            "reference_n": len(ref_requests),
            "reference_seconds_per_edit": _per_edit(ref_rows),
            "reference_phases_per_edit": {p: _per_edit(ref_rows, p) for p in PHASES},
            "seconds_per_edit_on_reference_edits": fast_first,
            "speedup": _per_edit(ref_rows) / fast_first,
            "efficacy": checkpoint["success"],
            "efficacy_top1": checkpoint["top1"],
            "reference_efficacy": ref_eff["success"],
            "reference_efficacy_top1": ref_eff["top1"],
            "reference_batches": ref_rows,
        })
    return result


def _steps_per_edit(rows: Sequence[dict[str, Any]]) -> float | None:
    """Adam steps per edit over the stream (0 for requests a one-step target settled)."""
    steps = [s for r in rows for s in r.get("target_steps") or []]
    return statistics.fmean(steps) if steps else None


class _GenerationCheck:
    """The generation metrics (:mod:`rlsedit.eval.generation`) of a seeded sample of
    ``config.gen_n`` edits: the neighbourhood's continuations are taken on the unedited model
    when this is made, the rest by :meth:`after` once the stream is done."""

    def __init__(self, lm, requests: Sequence[EditRequest], config: SpeedBenchConfig) -> None:
        from ..eval.generation import GenerationConfig, paraphrase_kind_of_file, pre_edit_generations

        self.requests = requests
        self.config = GenerationConfig(n=min(config.gen_n, len(requests)),
                                       paraphrase_kind=paraphrase_kind_of_file(config.data))
        self.pre_edit = pre_edit_generations(lm, requests, self.config)

    def after(self, lm) -> dict[str, Any]:
        from ..eval.generation import evaluate_generation

        result = evaluate_generation(lm, self.requests, self.config, pre_edit=self.pre_edit)
        return {"summary": result["summary"], "counts": result["counts"], "notes": result["notes"]}


def _floor(lm, editor, batches, rows, device) -> dict[str, Any] | None:
    """The stream's FLOP floor (:mod:`rlsedit.bench.floor`) from its real token counts and
    the Adam steps each request took, at this machine's measured matrix-product rate."""
    from .floor import batch_flops, floor_summary, matmul_rate

    total = {"targets": 0.0, "keys": 0.0, "solve": 0.0}
    kl_prompt = editor._target_config().kl_prompt
    for batch, row in zip(batches, rows):
        steps = row.get("target_steps") or [round(row["target_steps_mean"] or editor.config.v_num_grad_steps)] * len(batch)
        for k, v in batch_flops(editor.lm, editor.layers, batch, editor.prefixes_, steps, kl_prompt).items():
            total[k] += v
    rates = {"float32": matmul_rate(torch.float32, device)}
    if getattr(editor.config, "v_dtype", "float32") == "bfloat16":
        rates["targets"] = matmul_rate(torch.bfloat16, device)
    return floor_summary(total, sum(len(b) for b in batches), rates)


def _covering(rows: Sequence[dict[str, Any]], n: int) -> int:
    """Edits done at the end of the first batch that reaches ``n`` edits."""
    return next(r["edits_done"] for r in rows if r["edits_done"] >= n)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_comparison(result: dict[str, Any]) -> str:
    """One row per value-target method of a multi-method run (``result["by_target"]``)."""
    s = result["settings"]
    lines = [
        f"model `{s['model']}`, method `{s['method']}`, n = {result['n']}, batch {s['batch_size']}, "
        f"layers {s['layers']}, {s['prefixes']} prefixes, {s['threads']} threads, torch {s['torch']}; "
        "one stream per value-target method, the same edits, in this order",
        "",
        "| targets | s/edit | targets | keys | solve | book-keeping | Adam steps/edit | efficacy | generalization "
        "| specificity | gen. edit begins | gen. chat mentions | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in result["targets"]:
        r = result["by_target"][name]
        ph, q = r["phases_per_edit"], r.get("quality_all") or {}
        gen = (r.get("generation") or {}).get("summary") or {}
        steps = r.get("target_steps_per_edit")
        lines.append(
            f"| {name} | {r['seconds_per_edit']:.3f} | {ph['targets']:.3f} | {ph['keys']:.3f} | {ph['solve']:.4f} | "
            f"{ph['bookkeeping']:.4f} | {'–' if steps is None else f'{steps:.1f}'} | {_pct(q.get('efficacy'))} | "
            f"{_pct(q.get('generalization'))} | {_pct(q.get('specificity'))} | {_pct(gen.get('edit_begins'))} | "
            f"{_pct(gen.get('chat_mentions'))} | {r['peak_rss_mb']:.0f} MiB{'' if r.get('peak_rss_is_this_stream') else '*'} |")
    variants = s.get("variants") or {}
    if variants:
        lines += [""] + [f"- `{name}`: {', '.join(f'{k} = {v!r}' for k, v in overrides.items())}"
                         for name, overrides in variants.items()]
    lines += ["", "Teacher-forced metrics (ROME's success rates) of all n edits after each stream; generation "
              "metrics (eval/generation.py) of a seeded sample, '–' when not asked (--gen-n). Peak RSS is each "
              "stream's own high-water mark (* where it could not be reset: the process's peak so far)."]
    for name in result["targets"]:
        lines += ["", f"### {name}", "", format_markdown(result["by_target"][name]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def format_markdown(result: dict[str, Any]) -> str:
    if "by_target" in result:
        return format_comparison(result)
    s = result["settings"]
    ph = result["phases_per_edit"]
    hist = result["history"]
    lines = [
        f"model `{s['model']}`, method `{s['method']}`, n = {result['n']}, batch {s['batch_size']}, "
        f"layers {s['layers']}, {s['prefixes']} prefixes, {s['threads']} threads, torch {s['torch']}",
        "",
        "| | s/edit | targets | keys | solve | bookkeeping | edits/min | efficacy | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| stream (all {result['n']}) | {result['seconds_per_edit']:.3f} | {ph['targets']:.3f} | {ph['keys']:.3f} | "
        f"{ph['solve']:.4f} | {ph['bookkeeping']:.4f} | {result['edits_per_minute']:.1f} | "
        f"{100 * result['efficacy_all']:.1f} | {100 * result['efficacy_all_top1']:.1f} |",
    ]
    if result.get("quality_all"):
        q, steps = result["quality_all"], result.get("target_steps_per_edit")
        gen = (result.get("generation") or {}).get("summary")
        lines += ["", f"value targets by `{result.get('target_method', 'adam')}`, "
                  f"{'–' if steps is None else f'{steps:.1f}'} Adam steps per edit; all {result['n']} edits after the "
                  f"stream, teacher-forced: efficacy {_pct(q.get('efficacy'))}, generalization "
                  f"{_pct(q.get('generalization'))}, specificity {_pct(q.get('specificity'))}"
                  + ("" if not gen else "; generation (a sample): " + ", ".join(
                      f"{k} {_pct(v)}" for k, v in gen.items() if v is not None))]
    if "reference_seconds_per_edit" in result:
        rp = result["reference_phases_per_edit"]
        lines += [
            f"| batched, first {result['reference_n']} | {result['seconds_per_edit_on_reference_edits']:.3f} | | | | | | "
            f"{100 * result['efficacy']:.1f} | {100 * result['efficacy_top1']:.1f} |",
            f"| reference, first {result['reference_n']} | {result['reference_seconds_per_edit']:.3f} | "
            f"{rp['targets']:.3f} | {rp['keys']:.3f} | {rp['solve']:.4f} | – | "
            f"{60 / result['reference_seconds_per_edit']:.1f} | {100 * result['reference_efficacy']:.1f} | "
            f"{100 * result['reference_efficacy_top1']:.1f} |",
            "",
            f"speedup over the per-request reference: **{result['speedup']:.2f}×**",
        ]
    lines += [
        "",
        f"history (first vs last {hist['batches_each']} batches, s/edit): total {hist['total']['first']:.3f} → "
        f"{hist['total']['last']:.3f} (ratio {hist['total']['ratio']:.3f}); "
        + "; ".join(f"{p} {hist[p]['first']:.4f} → {hist[p]['last']:.4f}" for p in PHASES)
        + (f"; target steps {hist['target_steps']['first']:.1f} → {hist['target_steps']['last']:.1f}"
           if "target_steps" in hist else "")
        + (f"; bookkeeping without snapshot batches {hist['bookkeeping_between_snapshots']['first']:.4f} → "
           f"{hist['bookkeeping_between_snapshots']['last']:.4f}" if "bookkeeping_between_snapshots" in hist else "")
        + (f"; a snapshot batch's bookkeeping {hist['snapshot_bookkeeping_seconds']['first']:.2f} s (first) → "
           f"{hist['snapshot_bookkeeping_seconds']['last']:.2f} s (last of {hist['snapshot_bookkeeping_seconds']['count']})"
           if "snapshot_bookkeeping_seconds" in hist else ""),
        "",
        "floor (matrix products of the real tokens at the measured rate "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["floor"]["matmul_gflops"].items()) + "): "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["floor"]["floor_seconds_per_edit"].items())
        + f" s/edit; total {result['floor']['floor_seconds_per_edit_total']:.3f} s/edit "
        f"(measured / floor = {result['seconds_per_edit_over_floor']:.2f})",
        "",
        f"peak RSS {result['peak_rss_mb']:.0f} MiB ({result['peak_rss_after_create_mb']:.0f} MiB by the end of "
        f"loading and session creation); model {result['model_mb']:.0f} MiB + editor state "
        f"{result['state_mb']:.0f} MiB + 1 GiB = {result['rss_budget_mb']:.0f} MiB",
    ]
    if result.get("peak_device_mb") is not None:
        lines += ["", f"peak GPU memory ({s.get('gpu')}): {result['peak_device_mb']:.0f} MiB allocated by tensors"]
    return "\n".join(lines) + "\n"


def plot_speed(result: dict[str, Any], path: str | Path) -> None:
    """Seconds per edit of every batch along the stream, stacked by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "by_target" in result:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in result["targets"]:
            rows = result["by_target"][name]["batches"]
            ax.plot([r["edits_done"] for r in rows], [r["seconds"] / r["size"] for r in rows], marker=".", label=name)
        ax.set_xlabel("edits applied")
        ax.set_ylabel("seconds per edit")
        ax.set_title(f"{result['settings']['model']} · {result['settings']['method']} · by value-target method")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    rows = result["batches"]
    x = [r["edits_done"] - r["size"] for r in rows]  # a bar spans its batch's edits
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        y = [r[phase] / r["size"] for r in rows]
        ax.bar(x, y, bottom=bottom, width=0.9 * result["settings"]["batch_size"], align="edge", label=phase)
        bottom = [b + v for b, v in zip(bottom, y)]
    if "reference_seconds_per_edit" in result:
        ax.axhline(result["reference_seconds_per_edit"], color="k", ls="--",
                   label=f"reference (first {result['reference_n']})")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("seconds per edit")
    ax.set_title(f"{result['settings']['model']} · {result['settings']['method']} · batch "
                 f"{result['settings']['batch_size']}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
