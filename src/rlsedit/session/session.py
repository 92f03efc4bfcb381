"""A lifelong editing session: an editor whose every accepted batch is durable.

State directory (see :mod:`rlsedit.session.store`): the manifest holds the model spec and
fingerprint, the method, its config, the edited layers and the context prefixes; snapshots
hold the editor's tensors (W_0, W, solver state, E[kkᵀ]) plus an index of live edit ids; the
journal holds every accepted batch (its requests and per-layer K, V) and every undo.

Order of an edit (why nothing acknowledged is lost and nothing is half-applied):
``propose`` (compute; weights written, solver state not committed) → ``journal append``
(durable: this is the acknowledgement) → ``commit`` in memory. An error before the append
rolls the weights back; a crash after it is repaired on open by replaying the journal.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import save_file

from .. import __version__
from ..editors import EditRecord, get_editor_class
from ..errors import (InvalidRequestError, NumericalError, RLSEditError, StateCorruptError, StateError,
                      StateMismatchError)
from ..locate.corpus import corpus_label, resolve_corpus
from ..model.load import EMBEDDED, load_model
from ..model.weights import down_proj, get_W, weights_sha256
from ..requests import EditRequest, as_requests, target_text
from .store import StateStore, is_state_dir

log = logging.getLogger(__name__)

@dataclass
class Runtime:
    """How to run, never saved: device, progress bars, caches, snapshot cadence."""

    device: str = "cpu"
    progress: bool = False
    cache_dir: str | None = None
    corpus: str | None = None
    snapshot_every: int = 25  # batches between snapshots (bounds replay time on open)
    target_rows: int | None = None  # rows per pass of the value-target optimisation (Editor's target_rows)


@dataclass
class EditReport:
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Counts, the skipped edits with their reasons, and the seconds (what ``edit --json`` prints)."""
        return {"applied": len(self.applied), "already_applied": len(self.already_applied),
                "skipped": self.skipped, "seconds": round(self.seconds, 3)}


class Session:
    """An open, locked state directory with its model and editor.

    Use :meth:`create` or :meth:`open` (or :meth:`open_or_create`), then :meth:`edit`,
    :meth:`undo`, :meth:`status`, :meth:`export`; :meth:`close` (or ``with``) releases the lock.
    """

    def __init__(self, directory: Path, store: StateStore, lm, editor, runtime: Runtime,
                 index: dict[str, list[int]], undone: set[str], batches_since_snapshot: int,
                 s_spectrum: dict[str, list[float]] | None = None) -> None:
        self.directory = directory
        self.store = store  # holds the directory's lock until close()
        self.lm = lm
        self.editor = editor
        self.runtime = runtime
        self.index = index  # live edit id -> [journal seq, column]
        self.undone = undone
        self._since_snapshot = batches_since_snapshot
        # [λ_min(S), λ_max(S)] of the last update/downdate per layer; carried through snapshots
        # because a solver state rebuilt from a snapshot no longer holds its last S (status shows it)
        self._s_spectrum = dict(s_spectrum or {})

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, *, model: str = "smollm2", method: str = "rlsedit",
               config=None, runtime: Runtime | None = None) -> "Session":
        runtime = runtime or Runtime()
        directory = Path(directory)
        editor_cls = get_editor_class(method)
        config = config if config is not None else editor_cls.config_class()
        if not isinstance(config, editor_cls.config_class):
            raise InvalidRequestError(f"method {method!r} needs a {editor_cls.config_class.__name__}")
        if is_state_dir(directory):
            raise StateError(f"{directory} already holds a state; open it instead of creating one")
        lm = load_model(_model_spec(model), device=runtime.device, cache_dir=runtime.cache_dir)
        layers = editor_cls.layers_for(lm, config)
        moments = _moments(lm, layers, config, runtime) if editor_cls.needs_moments else None
        editor = editor_cls(lm, config, moments=moments, progress=runtime.progress, keep_history=False,
                            target_rows=runtime.target_rows)
        meta = {
            "rlsedit_version": __version__,
            "model": {"spec": lm.spec, "name": lm.name, "fingerprint": lm.fingerprint,
                      "family": lm.arch.family, "d_k": lm.d_k, "d_model": lm.d_model, "n_layers": lm.n_layers},
            "method": method,
            "config": config.to_dict(),
            "layers": list(editor.layers),
            "prefixes": editor.prefixes_,
            "corpus": corpus_label(runtime.corpus) if moments is not None else None,
        }
        directory.mkdir(parents=True, exist_ok=True)
        store = StateStore.create(directory, meta)  # takes the directory's lock
        try:
            # A crash before this write leaves a state without a snapshot; open() finishes it.
            store.write_snapshot(editor.state_dict(), _snapshot_meta(editor, {}, set(), {}), covers_seq=0)
        except BaseException:
            store.close()
            raise
        return cls(directory, store, lm, editor, runtime, {}, set(), 0)

    @classmethod
    def open(cls, directory: str | Path, *, runtime: Runtime | None = None, model: str | None = None,
             method: str | None = None, read_only: bool = False) -> "Session":
        """Open an existing state; ``model``/``method``, when given, must match what it was made with.

        ``read_only``: take no lock and write nothing (``status``, ``ask``, ``export``, ``eval``);
        it sees the acknowledged state as of opening, also while another process edits, and
        refuses :meth:`edit` and :meth:`undo`.
        """
        runtime = runtime or Runtime()
        directory = Path(directory)
        if not is_state_dir(directory):
            raise StateError(f"{directory} is not a state directory (no manifest.json)")
        # verifies every file first, reading the snapshot in its verifying pass; a writer locks
        if read_only:
            store, snapshot = StateStore.open_read_only(directory)
        else:
            store, snapshot = StateStore.open_reading_snapshot(directory)
        try:
            meta = store.meta
            _check_meta(meta, store)
            if method is not None and method != meta["method"]:
                raise StateMismatchError(f"{directory} was made with method {meta['method']!r}, not {method!r}")
            if model is not None and _model_spec(model) != _model_spec(meta["model"]["spec"]):
                raise StateMismatchError(
                    f"{directory} was made for model {meta['model']['spec']!r}, not {model!r}")
            lm = load_model(meta["model"]["spec"], device=runtime.device, cache_dir=runtime.cache_dir)
            if lm.fingerprint != meta["model"]["fingerprint"]:
                raise StateMismatchError(
                    f"{directory} was made for model weights {meta['model']['fingerprint'][:12]}…, but "
                    f"{meta['model']['spec']!r} now loads {lm.fingerprint[:12]}…; refusing to mix them")
            editor_cls = get_editor_class(meta["method"])
            config = _stored_config(editor_cls, meta, store)
            layers = tuple(meta["layers"])
            if editor_cls.layers_for(lm, config) != layers:
                raise StateMismatchError(f"state layers {list(layers)} differ from its config's layers")
            if snapshot is None and read_only:
                raise StateError(f"{directory} has no snapshot yet (its creation was interrupted or is under way); "
                                 "open it for writing (e.g. rlsedit edit) to finish it")
            if snapshot is None:
                _finish_create(store, lm, editor_cls, config, meta, runtime)
                snapshot = store.read_snapshot()
            tensors, snap_meta, covers_seq = snapshot
            _check_snapshot_meta(snap_meta, store)
            moments = {l: tensors[f"layers.{l}.mom2"] for l in layers} if editor_cls.needs_moments else None
            editor = editor_cls(lm, config, moments=moments, prefixes=meta["prefixes"], progress=runtime.progress,
                                keep_history=False, target_rows=runtime.target_rows)
            editor.load_state_dict(tensors, n_edits=snap_meta["n_edits"], n_batches=snap_meta["n_batches"])
            index = {k: list(v) for k, v in snap_meta["index"].items()}
            undone = set(snap_meta["undone"])
            s_spectrum = dict(snap_meta.get("s_spectrum_last", {}))
            replayed = 0
            for entry in store.entries(covers_seq):  # snapshot = state after entries 0..covers_seq-1
                _replay(editor, store, entry, index, undone)
                replayed += 1
            if replayed:
                log.info("replayed %d journal entries after the snapshot", replayed)
                s_spectrum.update(_s_spectra(getattr(editor, "states_", {})))
        except BaseException:
            store.close()
            raise
        return cls(directory, store, lm, editor, runtime, index, undone, replayed, s_spectrum)

    @classmethod
    def open_or_create(cls, directory, *, model=None, method=None, config=None, runtime=None) -> "Session":
        if is_state_dir(Path(directory)):
            session = cls.open(directory, runtime=runtime, model=model, method=method)
            if config is not None:
                try:  # a state keeps the configuration it was made with (layers, λ, μ, ...)
                    _check_same_config(session.store.meta, config, directory)
                except BaseException:
                    session.close(snapshot=False)
                    raise
            return session
        return cls.create(directory, model=model or "smollm2", method=method or "rlsedit", config=config,
                          runtime=runtime)

    # ---- editing ------------------------------------------------------------------------------
    def validate(self, request: EditRequest) -> None:
        """Checks that need the model: tokens exist and the longest prompt fits the context."""
        tok = self.lm.tokenizer
        if not tok(target_text(request.target_new), add_special_tokens=False)["input_ids"]:
            raise InvalidRequestError(f"edit {request.id}: target_new {request.target_new!r} has no tokens")
        limit = getattr(self.lm.model.config, "max_position_embeddings", None)
        longest = max(self.editor.prefixes_ or ["{}"], key=len)
        text = longest.replace("{}", request.text) + target_text(request.target_new)
        n = len(tok(text)["input_ids"])
        if limit is not None and n > limit:
            raise InvalidRequestError(
                f"edit {request.id}: prompt is {n} tokens with prefix and target, over the model's context of {limit}")

    def edit(self, requests: Sequence[EditRequest], *, batch_size: int = 1, skip_bad: bool = False,
             progress: bool | None = None) -> EditReport:
        """Apply ``requests`` in batches; ids already applied (a resumed run) are skipped.

        Without ``skip_bad`` the first bad edit raises and nothing of its batch is applied
        (earlier batches stay acknowledged). With it, a bad edit is reported and skipped.
        """
        from tqdm.auto import tqdm

        self._refuse_if_read_only("edit")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidRequestError(f"batch size must be a positive integer, got {batch_size!r}")
        requests = as_requests(requests)  # EditRequests or records in any layout; all parsed first
        report = EditReport()
        start = time.perf_counter()
        valid: list[EditRequest] = []
        seen: set[str] = set()
        for r in requests:
            if r.id in seen:
                raise InvalidRequestError(f"edit id {r.id!r} occurs twice in this stream")
            seen.add(r.id)
            if r.id in self.index:  # an undone edit submitted again is applied again
                valid.append(r)
                continue
            try:
                self.validate(r)
            except RLSEditError as exc:
                if not skip_bad:
                    raise
                report.skipped.append({"id": r.id, "error": str(exc)})
                continue
            valid.append(r)
        # Batches are cut from the stream by position, *then* what is already applied is
        # dropped: a resumed run (after a crash, or after --skip-bad split a batch) forms
        # exactly the batches of an uninterrupted run, so it ends in the same weights.
        batches = []
        for b in range(0, len(valid), batch_size):
            batch = []
            for r in valid[b:b + batch_size]:
                if r.id in self.index:
                    report.already_applied.append(r.id)
                else:
                    batch.append(r)
            if batch:
                batches.append(batch)
        show = self.runtime.progress if progress is None else progress
        with tqdm(total=sum(map(len, batches)), disable=not show, desc="editing", unit="edit") as bar:
            for batch in batches:
                try:
                    self._apply_batch(batch)
                    report.applied.extend(r.id for r in batch)
                except (InvalidRequestError, NumericalError) as exc:
                    if not skip_bad:
                        raise
                    if len(batch) == 1:
                        report.skipped.append({"id": batch[0].id, "error": str(exc)})
                    else:  # find the culprit(s): one at a time
                        for r in batch:
                            try:
                                self._apply_batch([r])
                                report.applied.append(r.id)
                            except (InvalidRequestError, NumericalError) as exc1:
                                report.skipped.append({"id": r.id, "error": str(exc1)})
                bar.update(len(batch))
        report.seconds = time.perf_counter() - start
        return report

    def _apply_batch(self, batch: list[EditRequest]) -> None:
        which = f"edit {batch[0].id}" if len(batch) == 1 else "batch of edits " + ", ".join(r.id for r in batch)
        try:
            proposal = self.editor.propose(batch)
        except (InvalidRequestError, NumericalError) as exc:
            # the editor's message says why; say which edits (the weights are already restored)
            raise type(exc)(f"{which}: {exc}") from exc
        try:
            seq = self.store.append("batch", {"requests": [r.to_record() for r in batch],
                                              "ids": list(proposal.record.ids), "info": proposal.record.info},
                                    proposal.record.tensors)
        except BaseException:
            proposal.rollback()
            raise
        proposal.commit()
        for column, edit_id in enumerate(proposal.record.ids):
            self.index[edit_id] = [seq, column]
            self.undone.discard(edit_id)
        self._s_spectrum.update(_s_spectra(proposal.new_state))
        self._since_snapshot += 1
        if self._since_snapshot >= self.runtime.snapshot_every:
            self.snapshot()

    def undo(self, edit_id: str) -> None:
        """Remove an earlier edit exactly (RLSEdit); other methods raise UnsupportedError."""
        self._refuse_if_read_only("undo")
        edit_id = str(edit_id)
        if edit_id not in self.index:
            known = "it was already undone" if edit_id in self.undone else "no such edit in the journal"
            raise InvalidRequestError(f"cannot undo edit {edit_id!r}: {known}")
        seq, column = self.index[edit_id]
        record = _record(self.store.read_entry(seq))
        proposal = self.editor.propose_undo(record, column)
        self.store.append("undo", {"id": edit_id, "seq": seq, "column": column}, {})
        proposal.commit()
        self._s_spectrum.update(_s_spectra(getattr(proposal, "new_states", {})))
        del self.index[edit_id]
        self.undone.add(edit_id)
        self._since_snapshot += 1

    def _refuse_if_read_only(self, verb: str) -> None:
        if self.store.read_only:
            raise StateError(f"cannot {verb}: {self.directory} was opened read-only; open it for writing")

    def snapshot(self) -> None:
        """Write the editor's full state so reopening need not replay the journal."""
        self.store.write_snapshot(self.editor.state_dict(),
                                  _snapshot_meta(self.editor, self.index, self.undone, self._s_spectrum),
                                  covers_seq=self.store.journal_count)
        self._since_snapshot = 0

    # ---- inspection and export ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What the state holds now: model, method, layers, edit and journal counts, the weights'
        sha256, per-layer diagnostics (drift, anchor residual, conditioning) and the config."""
        meta = self.store.meta
        return {
            "state_dir": str(self.directory),
            "model": meta["model"]["spec"],
            "model_fingerprint": meta["model"]["fingerprint"],
            "method": meta["method"],
            "layers": list(self.editor.layers),
            "edits_applied": len(self.index),
            "edits_undone": len(self.undone),
            "batches": self.editor.n_batches_,
            "journal_entries": self.store.journal_count,
            "weights_sha256": weights_sha256(self.lm),
            "layer_diagnostics": self._layer_diagnostics(),
            "config": meta["config"],
        }

    def _layer_diagnostics(self) -> dict[str, Any]:
        """The editor's per-layer diagnostics, plus the extreme eigenvalues of the last ``S``.

        ``cond(S)`` alone says nothing for rank-one updates (``S`` is 1×1, so it is 1);
        ``λ_max(S) = 1 + kᵀCk`` of an update is how much it shrinks ``C`` along ``Ck``, and
        ``λ_min(S)`` of an undo (downdate) how much it grows ``C``. They come from the session's
        record when the solver state was rebuilt from a snapshot (which keeps no ``S``).
        """
        out = self.editor.diagnostics()
        for layer, d in out.items():
            if layer not in self._s_spectrum:
                continue
            low, high = self._s_spectrum[layer]
            d["S_eig_min_last"], d["S_eig_max_last"] = low, high
            if "S_condition_last" in d and d["S_condition_last"] is None:
                d["S_condition_last"] = high / low
        return out

    def export(self, out: str | Path, *, delta_only: bool = False) -> Path:
        """A full Hugging Face checkpoint, or (``delta_only``) a safetensors file of W − W_0."""
        out = Path(out)
        if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
            raise InvalidRequestError(f"export target {out} exists and is not empty; choose a new path")
        out.mkdir(parents=True, exist_ok=True)
        if not delta_only:
            self.lm.model.save_pretrained(out)
            self.lm.tokenizer.save_pretrained(out)
            return out
        tensors = {}
        for l in self.editor.layers:
            name = f"{self.lm.arch.layers}.{l}.{self.lm.arch.mlp_down}.weight"
            delta = get_W(self.lm, l) - self.editor.W0[l]  # (d_k, d_v)
            native = delta if self.lm.arch.conv1d else delta.T
            assert tuple(native.shape) == tuple(down_proj(self.lm, l).weight.shape)
            tensors[name] = native.contiguous()
        meta = {"format": "rlsedit-delta", "base_model": self.lm.spec, "base_fingerprint": self.lm.fingerprint,
                "method": self.store.meta["method"], "edits_applied": str(len(self.index)),
                "note": "add each tensor to the base model's parameter of the same name"}
        path = out / "delta.safetensors"
        save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
        return path

    # ---- lifetime -----------------------------------------------------------------------------
    def close(self, *, snapshot: bool = True) -> None:
        """Snapshot (if anything is not yet in one) and release the lock; again is a no-op."""
        if self.store.closed:
            return
        try:
            if snapshot and self._since_snapshot and not self.store.read_only:
                self.snapshot()
        finally:
            self.store.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(snapshot=exc_type is None)


def _moments(lm, layers, config, runtime: Runtime) -> dict[int, torch.Tensor]:
    from ..locate.stats import second_moments

    corpus = resolve_corpus(runtime.corpus)  # None: the corpus bundled with the package
    stats = second_moments(lm, list(layers), corpus, max_tokens=config.mom2_n_samples,
                           cache_dir=runtime.cache_dir, progress=runtime.progress)
    return {l: stats[l].mom for l in layers}


def _snapshot_meta(editor, index: dict, undone: Iterable[str], s_spectrum: dict[str, list[float]]) -> dict[str, Any]:
    return {"n_edits": editor.n_edits_, "n_batches": editor.n_batches_, "index": index,
            "undone": sorted(undone), "s_spectrum_last": dict(s_spectrum)}


def _last_s(state) -> torch.Tensor | None:
    """The ``S`` (u, u) float64 of a solver state's last update/downdate, for solvers that keep
    one (:attr:`~rlsedit.solvers.rls.RLSState.last_S`)."""
    S = getattr(state, "last_S", None)
    return S if isinstance(S, torch.Tensor) and S.dim() == 2 and S.numel() else None


def _s_spectra(states: dict) -> dict[str, list[float]]:
    """``[λ_min(S), λ_max(S)]`` of the last factored ``S`` per layer."""
    out = {}
    for layer, state in states.items():
        S = _last_s(state)
        if S is not None:
            eigenvalues = torch.linalg.eigvalsh(S)
            out[str(layer)] = [float(eigenvalues[0]), float(eigenvalues[-1])]
    return out


def _model_spec(spec: str) -> str:
    """A model spec as stored: a local directory or file becomes an absolute path, so the
    state opens from any working directory; embedded and hub names stay as they are."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec not in EMBEDDED and path.exists():
        return str(path.resolve())
    return spec


def _check_meta(meta: dict, store: StateStore) -> None:
    """The manifest's meta has the fields and types a session writes (its checksum already
    matched, so a failure here means a forged or foreign manifest)."""
    model = meta.get("model")
    problems = []
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("spec", "fingerprint")):
        problems.append("model must hold the strings spec and fingerprint")
    if not isinstance(meta.get("method"), str):
        problems.append("method must be a string")
    if not isinstance(meta.get("config"), dict):
        problems.append("config must be an object")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        problems.append("layers must be a list of integers")
    prefixes = meta.get("prefixes")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p.count("{}") == 1 for p in prefixes):
        problems.append("prefixes must be a list of strings with one '{}' each")
    if problems:
        raise StateCorruptError(
            f"manifest {store.directory / 'manifest.json'} is not a session's: " + "; ".join(problems))


def _check_snapshot_meta(snap_meta: Any, store: StateStore) -> None:
    ok = (isinstance(snap_meta, dict)
          and all(isinstance(snap_meta.get(k), int) and not isinstance(snap_meta.get(k), bool)
                  for k in ("n_edits", "n_batches"))
          and isinstance(snap_meta.get("index"), dict)
          and all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
                  for v in snap_meta["index"].values())
          and isinstance(snap_meta.get("undone"), list) and all(isinstance(x, str) for x in snap_meta["undone"])
          and isinstance(snap_meta.get("s_spectrum_last", {}), dict))
    if not ok:
        raise StateCorruptError(f"the snapshot of {store.directory} has malformed metadata (n_edits, n_batches, "
                                "index, undone)")


def _stored_config(editor_cls, meta: dict, store: StateStore):
    try:
        return editor_cls.config_class.from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        raise StateCorruptError(
            f"manifest {store.directory / 'manifest.json'}: stored config is invalid: {exc}") from None


def _check_same_config(meta: dict, config, directory) -> None:
    """Refuse hyperparameters that differ from the ones the state was made with."""
    if config.method != meta["method"]:
        raise StateMismatchError(
            f"{directory} was made with method {meta['method']!r}; the given hyperparameters are for "
            f"{config.method!r} (pass --method {meta['method']})")
    given, stored = config.to_dict(), meta["config"]
    differ = sorted(k for k in given.keys() | stored.keys() if given.get(k) != stored.get(k))
    if differ:
        detail = ", ".join(f"{k}: state has {stored.get(k)!r}, given {given.get(k)!r}" for k in differ)
        raise StateMismatchError(f"{directory} was made with other hyperparameters ({detail}); "
                                 "a state keeps its configuration: use a new --state for new settings")


def _finish_create(store: StateStore, lm, editor_cls, config, meta: dict, runtime: Runtime) -> None:
    """Write the initial snapshot of a state whose creation was interrupted before it.

    ``create`` writes the manifest (model, config, layers, prefixes) and then the snapshot
    of the unedited editor; both are functions of what the manifest records, so finishing
    gives the snapshot an uninterrupted ``create`` would have written.
    """
    if store.journal_count:
        raise StateCorruptError(f"{store.directory} has {store.journal_count} journal entries but no snapshot")
    log.warning("%s was left without its initial snapshot (interrupted creation); writing it now", store.directory)
    moments = None
    if editor_cls.needs_moments:
        moments = _moments(lm, meta["layers"], config, dataclasses.replace(runtime, corpus=meta.get("corpus")))
    editor = editor_cls(lm, config, moments=moments, prefixes=meta["prefixes"], progress=runtime.progress,
                        keep_history=False)
    store.write_snapshot(editor.state_dict(), _snapshot_meta(editor, {}, set(), {}), covers_seq=0)


def _record(entry) -> EditRecord:
    return EditRecord(ids=tuple(entry.meta["ids"]), tensors=entry.tensors, info=entry.meta.get("info", {}))


def _replay(editor, store: StateStore, entry, index: dict, undone: set) -> None:
    if entry.kind == "batch":
        editor.apply_record(_record(entry))
        for column, edit_id in enumerate(entry.meta["ids"]):
            index[edit_id] = [entry.seq, column]
            undone.discard(edit_id)
    elif entry.kind == "undo":
        seq, column = entry.meta["seq"], entry.meta["column"]
        editor.propose_undo(_record(store.read_entry(seq)), column).commit()
        index.pop(entry.meta["id"], None)
        undone.add(entry.meta["id"])
    else:
        raise StateError(f"journal entry {entry.seq} has unknown kind {entry.kind!r}")
