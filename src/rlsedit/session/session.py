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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import save_file

from .. import __version__
from ..editors import EditRecord, get_editor_class
from ..errors import InvalidRequestError, NumericalError, RLSEditError, StateError, StateMismatchError
from ..model.load import load_model
from ..model.weights import down_proj, get_W, weights_sha256
from ..requests import EditRequest, target_text
from .store import StateStore, is_state_dir

log = logging.getLogger(__name__)

# In a checkout beside the project's data folder, the small Wikipedia corpus is the default
# for E[kkᵀ]; elsewhere the user passes --corpus.
DEFAULT_CORPUS = Path(__file__).resolve().parents[4] / "shared" / "data" / "corpus" / "enwiki_pages_2MB.jsonl"


@dataclass
class Runtime:
    """How to run, never saved: device, progress bars, caches, snapshot cadence."""

    device: str = "cpu"
    progress: bool = False
    cache_dir: str | None = None
    corpus: str | None = None
    snapshot_every: int = 25  # batches between snapshots (bounds replay time on open)


@dataclass
class EditReport:
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"applied": len(self.applied), "already_applied": len(self.already_applied),
                "skipped": self.skipped, "seconds": round(self.seconds, 3)}


class Session:
    """An open, locked state directory with its model and editor.

    Use :meth:`create` or :meth:`open` (or :meth:`open_or_create`), then :meth:`edit`,
    :meth:`undo`, :meth:`status`, :meth:`export`; :meth:`close` (or ``with``) releases the lock.
    """

    def __init__(self, directory: Path, store: StateStore, lm, editor, runtime: Runtime,
                 index: dict[str, list[int]], undone: set[str], batches_since_snapshot: int) -> None:
        self.directory = directory
        self.store = store  # holds the directory's lock until close()
        self.lm = lm
        self.editor = editor
        self.runtime = runtime
        self.index = index  # live edit id -> [journal seq, column]
        self.undone = undone
        self._since_snapshot = batches_since_snapshot

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
        lm = load_model(model, device=runtime.device, cache_dir=runtime.cache_dir)
        layers = editor_cls.layers_for(lm, config)
        moments = _moments(lm, layers, config, runtime) if editor_cls.needs_moments else None
        editor = editor_cls(lm, config, moments=moments, progress=runtime.progress)
        meta = {
            "rlsedit_version": __version__,
            "model": {"spec": lm.spec, "name": lm.name, "fingerprint": lm.fingerprint,
                      "family": lm.arch.family, "d_k": lm.d_k, "d_model": lm.d_model, "n_layers": lm.n_layers},
            "method": method,
            "config": config.to_dict(),
            "layers": list(editor.layers),
            "prefixes": editor.prefixes_,
            "corpus": str(runtime.corpus or DEFAULT_CORPUS) if moments is not None else None,
        }
        directory.mkdir(parents=True, exist_ok=True)
        store = StateStore.create(directory, meta)  # takes the directory's lock
        try:
            store.write_snapshot(editor.state_dict(), _snapshot_meta(editor, {}, set()), covers_seq=0)
        except BaseException:
            store.close()
            raise
        return cls(directory, store, lm, editor, runtime, {}, set(), 0)

    @classmethod
    def open(cls, directory: str | Path, *, runtime: Runtime | None = None, model: str | None = None,
             method: str | None = None) -> "Session":
        """Open an existing state; ``model``/``method``, when given, must match what it was made with."""
        runtime = runtime or Runtime()
        directory = Path(directory)
        if not is_state_dir(directory):
            raise StateError(f"{directory} is not a state directory (no manifest.json)")
        store = StateStore.open(directory)  # takes the lock and verifies every file first
        try:
            meta = store.meta
            if method is not None and method != meta["method"]:
                raise StateMismatchError(f"{directory} was made with method {meta['method']!r}, not {method!r}")
            if model is not None and model != meta["model"]["spec"]:
                raise StateMismatchError(
                    f"{directory} was made for model {meta['model']['spec']!r}, not {model!r}")
            lm = load_model(meta["model"]["spec"], device=runtime.device, cache_dir=runtime.cache_dir)
            if lm.fingerprint != meta["model"]["fingerprint"]:
                raise StateMismatchError(
                    f"{directory} was made for model weights {meta['model']['fingerprint'][:12]}…, but "
                    f"{meta['model']['spec']!r} now loads {lm.fingerprint[:12]}…; refusing to mix them")
            editor_cls = get_editor_class(meta["method"])
            config = editor_cls.config_class.from_dict(meta["config"])
            tensors, snap_meta, covers_seq = store.read_snapshot()
            layers = tuple(meta["layers"])
            if editor_cls.layers_for(lm, config) != layers:
                raise StateMismatchError(f"state layers {list(layers)} differ from its config's layers")
            moments = {l: tensors[f"layers.{l}.mom2"] for l in layers} if editor_cls.needs_moments else None
            editor = editor_cls(lm, config, moments=moments, prefixes=meta["prefixes"], progress=runtime.progress)
            editor.load_state_dict(tensors, n_edits=snap_meta["n_edits"], n_batches=snap_meta["n_batches"])
            index = {k: list(v) for k, v in snap_meta["index"].items()}
            undone = set(snap_meta["undone"])
            replayed = 0
            for entry in store.entries(covers_seq):  # snapshot = state after entries 0..covers_seq-1
                _replay(editor, store, entry, index, undone)
                replayed += 1
            if replayed:
                log.info("replayed %d journal entries after the snapshot", replayed)
        except BaseException:
            store.close()
            raise
        return cls(directory, store, lm, editor, runtime, index, undone, replayed)

    @classmethod
    def open_or_create(cls, directory, *, model=None, method=None, config=None, runtime=None) -> "Session":
        if is_state_dir(Path(directory)):
            if config is not None:
                log.warning("--hparams is ignored: %s already has its configuration", directory)
            return cls.open(directory, runtime=runtime, model=model, method=method)
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

        if batch_size <= 0:
            raise InvalidRequestError(f"batch size must be positive, got {batch_size}")
        report = EditReport()
        start = time.perf_counter()
        todo: list[EditRequest] = []
        seen: set[str] = set()
        for r in requests:
            if r.id in seen:
                raise InvalidRequestError(f"edit id {r.id!r} occurs twice in this stream")
            seen.add(r.id)
            if r.id in self.index or r.id in self.undone:
                report.already_applied.append(r.id)
                continue
            try:
                self.validate(r)
            except RLSEditError as exc:
                if not skip_bad:
                    raise
                report.skipped.append({"id": r.id, "error": str(exc)})
                continue
            todo.append(r)
        show = self.runtime.progress if progress is None else progress
        with tqdm(total=len(todo), disable=not show, desc="editing", unit="edit") as bar:
            for b in range(0, len(todo), batch_size):
                batch = todo[b:b + batch_size]
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
        proposal = self.editor.propose(batch)
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
        self._since_snapshot += 1
        if self._since_snapshot >= self.runtime.snapshot_every:
            self.snapshot()

    def undo(self, edit_id: str) -> None:
        """Remove an earlier edit exactly (RLSEdit); other methods raise UnsupportedError."""
        edit_id = str(edit_id)
        if edit_id not in self.index:
            known = "it was already undone" if edit_id in self.undone else "no such edit in the journal"
            raise InvalidRequestError(f"cannot undo edit {edit_id!r}: {known}")
        seq, column = self.index[edit_id]
        record = _record(self.store.read_entry(seq))
        proposal = self.editor.propose_undo(record, column)
        self.store.append("undo", {"id": edit_id, "seq": seq, "column": column}, {})
        proposal.commit()
        del self.index[edit_id]
        self.undone.add(edit_id)
        self._since_snapshot += 1

    def snapshot(self) -> None:
        """Write the editor's full state so reopening need not replay the journal."""
        self.store.write_snapshot(self.editor.state_dict(), _snapshot_meta(self.editor, self.index, self.undone),
                                  covers_seq=self.store.journal_count)
        self._since_snapshot = 0

    # ---- inspection and export ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
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
            "layer_diagnostics": self.editor.diagnostics(),
            "config": meta["config"],
        }

    def export(self, out: str | Path, *, delta_only: bool = False) -> Path:
        """A full Hugging Face checkpoint, or (``delta_only``) a safetensors file of W − W_0."""
        out = Path(out)
        if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
            raise StateError(f"export target {out} exists and is not empty; choose a new path")
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
        try:
            if snapshot and self._since_snapshot:
                self.snapshot()
        finally:
            self.store.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(snapshot=exc_type is None)


def _moments(lm, layers, config, runtime: Runtime) -> dict[int, torch.Tensor]:
    from ..locate.stats import second_moments

    corpus = runtime.corpus or DEFAULT_CORPUS
    if not Path(corpus).is_file():
        raise InvalidRequestError(
            f"corpus {str(corpus)!r} for the key second moments does not exist; pass --corpus FILE")
    stats = second_moments(lm, list(layers), corpus, max_tokens=config.mom2_n_samples,
                           cache_dir=runtime.cache_dir, progress=runtime.progress)
    return {l: stats[l].mom for l in layers}


def _snapshot_meta(editor, index: dict, undone: Iterable[str]) -> dict[str, Any]:
    return {"n_edits": editor.n_edits_, "n_batches": editor.n_batches_, "index": index,
            "undone": sorted(undone)}


def _record(entry) -> EditRecord:
    return EditRecord(ids=tuple(entry.meta["ids"]), tensors=entry.tensors, info=entry.meta.get("info", {}))


def _replay(editor, store: StateStore, entry, index: dict, undone: set) -> None:
    if entry.kind == "batch":
        editor.apply_record(_record(entry))
        for column, edit_id in enumerate(entry.meta["ids"]):
            index[edit_id] = [entry.seq, column]
    elif entry.kind == "undo":
        seq, column = entry.meta["seq"], entry.meta["column"]
        editor.propose_undo(_record(store.read_entry(seq)), column).commit()
        index.pop(entry.meta["id"], None)
        undone.add(entry.meta["id"])
    else:
        raise StateError(f"journal entry {entry.seq} has unknown kind {entry.kind!r}")
