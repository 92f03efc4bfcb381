"""The editor base class: a streaming estimator over a stream of edit batches.

Every key/value method shares one batch procedure (MEMIT's spreading over layers; DESIGN.md):

1. ``z = compute_targets(...)``: the residual-stream state after the last edited layer ``L``
   at each subject's last token that makes ``target_new`` likely.
2. For each edited layer ``l`` in ascending order (the ``i``-th of ``m``):
   ``K = compute_keys(l)`` (d_k, u); ``R = (z − h_L) / (m − i)`` with ``h_L`` the current state
   at ``L`` (re-read after each layer's write); absolute targets ``V = KᵀW_l + R`` (u, d_v),
   mapped through a post-MLP norm where the architecture has one; then the method's
   ``_solve`` turns ``(K, V)`` into the new ``W_l``, which is written before the next layer.
   With ``preserve_count > 0``, preservation rows (the request's template with other subjects,
   their current output as target; :mod:`rlsedit.locate.preserve`) join ``(K, V)`` as extra columns.

A batch is a transaction (:meth:`Editor.propose` → :meth:`Proposal.commit` / ``rollback``):
the model's weights change while the batch is computed (layer ``l+1`` keys depend on layer
``l``'s write), but the solver state changes only on commit, and any error restores every
weight it touched. The session journals the :class:`EditRecord` between the two, so an edit
is acknowledged only once durable. :meth:`Editor.apply_record` replays a record without
recomputing keys or targets (resume), bit for bit.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch

from ..errors import InvalidRequestError, NumericalError, StateMismatchError, UnsupportedError
from ..model.arch import resolve
from ..model.device import synchronize
from ..model.weights import block, get_bias, get_W, set_W
from ..requests import SUBJECT_SLOT, EditRequest, as_requests, check_unique_ids
from .config import EditConfig
from .record import EditRecord

log = logging.getLogger(__name__)


@dataclass
class Proposal:
    """A computed batch whose weights are in the model but whose solver state is not committed."""

    editor: "Editor"
    record: EditRecord
    new_state: dict[int, Any]
    old_weights: dict[int, torch.Tensor]
    done: bool = False

    def commit(self) -> EditRecord:
        if self.done:
            raise RuntimeError("proposal already committed or rolled back")
        self.editor._commit_state(self.new_state)
        self.editor.n_edits_ += len(self.record.ids)
        self.editor.n_batches_ += 1
        self.editor._remember(self.record)
        self.done = True
        return self.record

    def rollback(self) -> None:
        if self.done:
            return
        self.editor._restore_weights(self.old_weights)
        self.done = True


def _check_finite(name: str, tensor: torch.Tensor, ids: Sequence[str]) -> None:
    """Refuse non-finite values, naming the edits they belong to: keys ``K (d_k, u)`` hold one
    edit per column, targets ``z (u, d)`` and ``V (u, d_v)`` one per row; a weight belongs to
    the whole batch."""
    bad = ~torch.isfinite(tensor)
    if not bad.any():
        return
    which = ""
    if tensor.dim() == 2 and name.endswith(".K") and tensor.shape[1] == len(ids):
        which = " (edits " + ", ".join(ids[i] for i in bad.any(dim=0).nonzero().flatten().tolist()) + ")"
    elif tensor.dim() == 2 and not name.endswith(".W") and tensor.shape[0] == len(ids):
        which = " (edits " + ", ".join(ids[i] for i in bad.any(dim=1).nonzero().flatten().tolist()) + ")"
    raise NumericalError(f"{name} has non-finite values{which}; nothing was applied")


class Editor:
    """Base of every editor. Subclasses set ``config_class`` and implement ``_init_state`` and ``_solve``.

    The constructor only stores its arguments (scikit-learn's rule); the first call that needs
    the editor's state (:meth:`partial_fit`, :meth:`state_dict`, or reading a learned
    attribute) prepares it: the corpus statistics ``E[kkᵀ]`` (computed once and cached on
    disk), ``W_0``, the context prefixes and the method's initial state.

    Parameters:
        lm: the :class:`~rlsedit.model.load.LoadedModel` to edit (its weights change in place).
        config: the method's hyperparameters (defaults when None).
        corpus: where ``E[kkᵀ]`` comes from when ``moments`` is not given: a corpus file, a list
            of texts, or None for the corpus bundled with the package.
        moments: ``{layer: E[kkᵀ] (d_k, d_k)}`` for the edited layers, for methods that use
            the corpus anchor (all but FT); given, it replaces ``corpus``.
        prefixes: the context prefixes (a resumed editor passes the ones it was made with).
        progress: show progress bars.
        targets: ``"batched"`` (:func:`~rlsedit.locate.targets.compute_targets`, the default) or
            ``"reference"`` (:func:`~rlsedit.locate.targets_reference.compute_targets_reference`, one request
            at a time through the whole model; the same objective, for the speed benchmark).
        cache_dir: cache of the corpus statistics (default ``~/.cache/rlsedit``).
        target_rows: most token rows per forward pass of the value-target optimisation (default
            :data:`~rlsedit.locate.target_config.TARGET_BATCH_SIZE`). How to run, not what is computed:
            the targets do not depend on it beyond float rounding. Larger passes use more memory
            and fewer, wider calls (a GPU's case); ROME and FT find their targets their own way.
        keep_history: keep every batch's keys and targets in memory, so :meth:`undo` and
            :meth:`save_pretrained` have them (a :class:`~rlsedit.session.session.Session`
            keeps them in its journal instead and turns this off).

    Attributes (learned state ends in ``_``): ``n_edits_``, ``n_batches_``, ``prefixes_``,
    ``history_`` (the accepted :class:`EditRecord` s) and ``live_`` (edit id → (batch, column)).
    """

    config_class: ClassVar[type[EditConfig]] = EditConfig
    name: ClassVar[str] = ""
    supports_undo: ClassVar[bool] = False
    needs_moments: ClassVar[bool] = True
    # whether the batch procedure consults ``target_log`` (FT writes no value targets)
    logs_value_targets: ClassVar[bool] = True

    def __init__(self, lm, config: EditConfig | None = None, *, corpus=None,
                 moments: dict[int, torch.Tensor] | None = None, prefixes: Sequence[str] | None = None,
                 progress: bool = False, targets: str = "batched", cache_dir=None, keep_history: bool = True,
                 target_rows: int | None = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise InvalidRequestError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if targets not in ("batched", "reference"):
            raise InvalidRequestError(f"targets must be 'batched' or 'reference', got {targets!r}")
        if target_rows is not None and (isinstance(target_rows, bool) or not isinstance(target_rows, int)
                                        or target_rows < 1):
            raise InvalidRequestError(f"target_rows must be a positive integer or None, got {target_rows!r}")
        self.lm = lm
        self.config = config
        self.targets = targets
        from ..locate.target_config import TARGET_BATCH_SIZE
        self.target_rows = TARGET_BATCH_SIZE if target_rows is None else target_rows
        self.progress = progress
        self.corpus = corpus
        self.cache_dir = cache_dir
        self.keep_history = keep_history
        self.layers: tuple[int, ...] = self.layers_for(lm, config)
        if moments is not None:
            self._check_moments(moments)
        self._given_moments = moments
        self._given_prefixes = None if prefixes is None else list(prefixes)
        # optional store of each batch's target residuals δ = z − h (``lookup(ids)``,
        # ``record(ids, δ)``): a batch it holds is replayed from them without optimising
        self.target_log = None
        self._prepared = False

    def __getattr__(self, name: str):
        # Only reached when normal look-up fails: a learned attribute read before the first
        # partial_fit prepares the editor, then is looked up again.
        if name.startswith("__") or self.__dict__.get("_prepared", True) or self.__dict__.get("_preparing"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._prepare()
        return getattr(self, name)

    def _check_moments(self, moments: dict[int, torch.Tensor]) -> None:
        missing = [l for l in self.layers if l not in moments]
        if missing:
            raise InvalidRequestError(f"{self.name}: key second moments missing for layers {missing}")
        for l in self.layers:
            if tuple(moments[l].shape) != (self.lm.d_k, self.lm.d_k):
                raise StateMismatchError(
                    f"layer {l}: second moment of shape {tuple(moments[l].shape)}, model has d_k={self.lm.d_k}")

    def _corpus_moments(self) -> dict[int, torch.Tensor]:
        from ..locate.corpus import resolve_corpus
        from ..locate.stats import second_moments

        corpus = self.corpus if isinstance(self.corpus, (list, tuple)) else resolve_corpus(self.corpus)
        stats = second_moments(self.lm, list(self.layers), corpus, max_tokens=self.config.mom2_n_samples,
                               cache_dir=self.cache_dir, progress=self.progress)
        return {l: stats[l].mom for l in self.layers}

    def _prepare(self) -> None:
        """Build what the constructor deferred: E[kkᵀ], W_0, prefixes, the initial state."""
        if self._prepared:
            return
        self._preparing = True
        try:
            self._build()
        finally:
            self._preparing = False
        self._prepared = True

    def _build(self) -> None:
        # first, so a model without a chat template fails before any statistics are computed
        chat = self._chat_prefix() if self._given_prefixes is None else None
        # likewise a bad subjects file; a resumed editor (given its prefixes) replays stored rows
        # and reads the file only when it computes a new batch
        self.preserve_pool_ = self._preserve_pool() if self._given_prefixes is None else None
        moments = self._given_moments
        if self.needs_moments and moments is None:
            moments = self._corpus_moments()
            self._check_moments(moments)
        # E[kkᵀ] lives where the weights live, so every solve runs on the model's device
        self.moments = {l: m.to(self.lm.device) for l, m in (moments or {}).items() if l in self.layers}
        self.W0 = {l: get_W(self.lm, l) for l in self.layers}
        # Context prefixes come from the *unedited* model, once: a resumed session must use the
        # same prefixes as the run it continues, whatever the weights are now.
        self.prefixes_: list[str] = (list(self._given_prefixes) if self._given_prefixes is not None
                                     else self._make_prefixes())
        if chat is not None:
            self.prefixes_.append(chat)
        self._reset_counters()
        self._init_state()
        self._given_moments = None  # held as self.moments from here on

    def _reset_counters(self) -> None:
        self.n_edits_ = 0
        self.n_batches_ = 0
        self.n_submitted_ = 0  # requests ever accepted: the default id of the next one
        self.history_: list[EditRecord] = []
        self.live_: dict[str, tuple[int, int]] = {}

    @property
    def anchor_weight(self) -> float:
        """``n`` of the anchor Gram ``n·E[kkᵀ]`` on this model (:meth:`EditConfig.anchor_weight`)."""
        return self.config.anchor_weight(self.lm.d_k)

    # ---- subclass interface -------------------------------------------------------------------
    def _init_state(self) -> None:
        """Build the method's per-layer state from ``self.W0`` and ``self.moments``."""

    def _solve(self, layer: int, K: torch.Tensor, V: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """New weight ``(d_k, d_v)`` and the layer's new (uncommitted) state from keys ``K (d_k,u)``
        and absolute targets ``V (u,d_v)``, given the current weight ``W``. Must not mutate state."""
        raise NotImplementedError

    def _commit_state(self, new_state: dict[int, Any]) -> None:
        """Adopt the per-layer states returned by ``_solve``."""

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's learned tensors (besides weights), named ``layers.<l>.<name>``."""
        return {}

    def load_method_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`method_state_dict`."""

    def diagnostics(self) -> dict[str, Any]:
        """Per-layer numbers worth watching (conditioning, symmetry, drift)."""
        out: dict[str, Any] = {}
        for l in self.layers:
            W = get_W(self.lm, l)
            d = {"drift_fro": float(torch.linalg.norm(W - self.W0[l]))}
            if l in self.moments:
                D = (W - self.W0[l]).double()
                # anchor residual ||K_0ᵀ(W − W_0)|| with K_0K_0ᵀ = n·E[kkᵀ]:  sqrt(n · tr(Dᵀ E D))
                quad = torch.einsum("ij,ik,kj->", D, self.moments[l].double(), D).clamp_min(0)
                d["anchor_residual"] = float(torch.sqrt(self.anchor_weight * quad))
            out[str(l)] = d
        return out

    # ---- layer choice -------------------------------------------------------------------------
    @classmethod
    def layers_for(cls, lm, config: EditConfig) -> tuple[int, ...]:
        """The layers this method edits on ``lm`` under ``config``."""
        layers = config.layers or lm.default_layers()
        bad = [l for l in layers if l >= lm.n_layers]
        if bad:
            raise InvalidRequestError(f"layers {bad} do not exist; the model has {lm.n_layers} layers")
        return tuple(layers)

    # ---- streaming API ------------------------------------------------------------------------
    def partial_fit(self, requests) -> "Editor":
        """Apply one batch of edits (one lifelong step). Returns self.

        ``requests``: :class:`~rlsedit.requests.EditRequest` s, dicts in any layout
        :func:`~rlsedit.requests.parse_request` reads, or one of either. A dict without an id
        gets its position in the editor's stream (``"0"``, ``"1"``, …).
        """
        self.propose(requests).commit()
        return self

    def fit(self, requests, batch_size: int = 1) -> "Editor":
        """Reset to the unedited weights, then stream ``requests`` in batches of ``batch_size``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.reset()
        requests = as_requests(requests)
        for start in range(0, len(requests), batch_size):
            self.partial_fit(requests[start:start + batch_size])
        return self

    def reset(self) -> "Editor":
        """Restore the unedited weights and the initial method state."""
        if not self._prepared:
            self._prepare()  # nothing was edited yet: that is the initial state
            return self
        for l in self.layers:
            set_W(self.lm, l, self.W0[l])
        self._reset_counters()
        self._init_state()
        return self

    def undo(self, edit_id) -> "Editor":
        """Remove the live edit ``edit_id`` exactly (methods with ``supports_undo``). Returns self."""
        if not self.supports_undo:
            return self.propose_undo(None, 0)  # raises the method's UnsupportedError
        if not self.keep_history:
            raise UnsupportedError("this editor keeps no edit history (keep_history=False); undo through the "
                                   "Session that journals its edits")
        edit_id = str(edit_id)
        if edit_id not in self.live_:
            raise InvalidRequestError(f"no live edit with id {edit_id!r} ({len(self.live_)} live edits)")
        batch, column = self.live_[edit_id]
        self.propose_undo(self.history_[batch], column).commit()
        del self.live_[edit_id]
        return self

    def _remember(self, record: EditRecord) -> None:
        """Book-keeping of an accepted batch (called by :meth:`Proposal.commit`)."""
        self.n_submitted_ += len(record.ids)
        if self.keep_history:
            self.history_.append(record)
            for column, edit_id in enumerate(record.ids):
                self.live_[edit_id] = (len(self.history_) - 1, column)

    def propose(self, requests) -> Proposal:
        """Compute one batch; the weights are written, the state is not yet committed.

        Any error restores the weights and re-raises; nothing is left half-applied.
        """
        self._prepare()
        requests = as_requests(requests, start=self.n_submitted_)
        if not requests:
            raise InvalidRequestError("an edit batch must hold at least one request")
        check_unique_ids(requests)
        live = [r.id for r in requests if r.id in self.live_]
        if live:
            raise InvalidRequestError(f"edit ids {live} are already live in this editor; undo them first or "
                                      "give new ids")
        old = {l: get_W(self.lm, l) for l in self.layers}
        try:
            record, new_state = self._compute_batch(requests)
        except BaseException:
            self._restore_weights(old)
            raise
        return Proposal(self, record, new_state, old)

    def apply_record(self, record: EditRecord) -> None:
        """Re-apply a journaled batch with its stored keys and targets (no model passes)."""
        self._prepare()
        old = {l: get_W(self.lm, l) for l in self.layers}
        try:
            new_state = {}
            for l in self.layers:
                # a journaled record is read onto the CPU; solve where the weights live
                K, V = (t.to(self.lm.device) for t in record_columns(record, l))
                W_new, new_state[l] = self._solve(l, K, V, get_W(self.lm, l))
                set_W(self.lm, l, W_new)
        except BaseException:
            self._restore_weights(old)
            raise
        Proposal(self, record, new_state, old).commit()

    def propose_undo(self, record: EditRecord, column: int):
        """Prepare the exact removal of edit ``record.ids[column]``; ``.commit()`` applies it.
        Only methods with ``supports_undo``."""
        raise UnsupportedError(
            f"{self.name} cannot undo an edit exactly (its update depends on the order of the stream); "
            "only 'rlsedit' supports undo")

    # ---- shared batch procedure ---------------------------------------------------------------
    def _target_config(self):
        """The config's value-target settings, an unset ``v_lr`` resolved for this model."""
        return self.config.target_config().for_model(self.lm)

    def _make_prefixes(self) -> list[str]:
        from ..locate.prefixes import context_prefixes

        c = self.config
        return list(context_prefixes(self.lm, count=c.context_count, length=c.context_length, seed=c.seed))

    def _chat_prefix(self) -> str | None:
        """The chat context prefix when the config asks for it (``chat_prefix``), else None."""
        from ..locate.prefixes import chat_context_prefix

        return chat_context_prefix(self.lm.tokenizer) if self.config.chat_prefix else None

    def _preserve_pool(self) -> list[str] | None:
        """The subjects preservation rows draw from when ``preserve_count > 0``, else None."""
        from ..locate.preserve import check_pool_size, load_subject_pool

        c = self.config
        if not c.preserve_count:
            return None
        pool = load_subject_pool(c.preserve_subjects)
        check_pool_size(pool, c.preserve_count, c.preserve_subjects)
        return pool

    def _preservation_reader(self, requests: list[EditRequest]):
        """A reader of the batch's preservation keys (each request's template with other
        subjects, bare): a :class:`~rlsedit.locate.keys.BatchKeys` at the subjects' last
        tokens, or with ``preserve_positions`` a :class:`~rlsedit.locate.keys.PromptKeys` at
        the prompts' last positions; None when off. Its ``keys(l)`` is ``(d_k, u·count·rows)``,
        request-major."""
        from ..locate.keys import BatchKeys, PromptKeys
        from ..locate.preserve import preservation_requests

        if not self.config.preserve_count:
            return None
        c = self.config
        if self.preserve_pool_ is None:
            self.preserve_pool_ = self._preserve_pool()
        pseudo = preservation_requests(requests, self.preserve_pool_, c.preserve_count, c.seed)
        if c.preserve_positions:
            return PromptKeys(self.lm, self.layers[0], self.layers[-1], pseudo, c.preserve_positions)
        return BatchKeys(self.lm, self.layers[0], self.layers[-1], pseudo, [SUBJECT_SLOT], average=c.key_average)

    @classmethod
    def target_log_entries(cls, requests: Sequence[EditRequest]) -> list[tuple[str, ...]]:
        """The target log's keys for a batch of ``requests``: the batch is optimised as one, so
        one entry (ROME, one request at a time, logs one per request)."""
        return [tuple(r.id for r in requests)]

    def _paraphrases(self, requests: list[EditRequest]) -> list[list[str]] | None:
        """The model's rewordings of each prompt for the value targets (``paraphrase_count``), else None."""
        if not self.config.paraphrase_count:
            return None
        from ..locate.paraphrases import paraphrase_templates

        c = self.config
        return paraphrase_templates(self.lm, requests, c.paraphrase_count, samples=c.paraphrase_samples, seed=c.seed)

    def _compute_batch(self, requests: list[EditRequest]) -> tuple[EditRecord, dict[int, Any]]:
        from ..locate.fasttargets import compute_value_targets
        from ..locate.keys import BatchKeys, compute_keys
        from ..locate.targets_reference import compute_targets_reference

        ids = tuple(r.id for r in requests)
        prefixes = self.prefixes_
        top = self.layers[-1]
        clock = _PhaseClock(self.lm.device)
        logged = None if self.target_log is None else self.target_log.lookup(ids)
        result = z = None
        with clock("targets"):
            rewordings = self._paraphrases(requests) if logged is None or self.config.paraphrase_keys else None
            if logged is None:
                # "batched": by the config's v_method (the Adam loop, or fasttargets' cheap paths)
                optimise = compute_value_targets if self.targets == "batched" else compute_targets_reference
                result = optimise(self.lm, top, requests, prefixes, self._target_config(),
                                  batch_size=self.target_rows, paraphrases=rewordings)
                z = result.z.float()  # (u, d_model)
                _check_finite("value target z", z, ids)
        tensors: dict[str, torch.Tensor] = {}
        new_state: dict[int, Any] = {}
        average = self.config.key_average
        key_rewordings = rewordings if self.config.paraphrase_keys else None
        with clock("keys"):
            # runs the blocks below the first layer once; each block above once, after the layers
            # below it were written (the keys a fresh compute_keys would read then)
            reader = BatchKeys(self.lm, self.layers[0], top, requests, prefixes, average=average,
                               paraphrases=key_rewordings)
            keeper = self._preservation_reader(requests)
        root_w = self.config.preserve_weight ** 0.5
        for i, l in enumerate(self.layers):
            with clock("keys"):
                K = compute_keys(self.lm, l, requests, prefixes, average=average, reader=reader,
                                 paraphrases=key_rewordings).float()  # (d_k, u)
                _check_finite(f"layers.{l}.K", K, ids)
                h = reader.hidden_at_top().float()  # (u, d_model), as hidden_at_subject(lm, top, requests)
            if i == 0 and self.target_log is not None:
                z = self._logged_target(ids, z, h, logged)
            with clock("solve"):
                R = (z - h) / (len(self.layers) - i)  # this layer's share of the residual
                W = get_W(self.lm, l)
                V = self._absolute_targets(l, K, W, R)  # (u, d_v)
                _check_finite(f"layers.{l}.V", V, ids)
                K_all, V_all = K, V
                if keeper is not None:
                    # read before layer l is written, as K; V_p = K_pᵀW keeps the output (a
                    # post-MLP norm of an unchanged v is unchanged), both scaled by √w
                    Kp = root_w * keeper.keys(l).float()  # (d_k, u·count·rows)
                    _check_finite(f"layers.{l}.Kp", Kp, ids)
                    Vp = Kp.T @ W  # (u·count·rows, d_v)
                    tensors[f"layers.{l}.Kp"], tensors[f"layers.{l}.Vp"] = Kp.contiguous(), Vp.contiguous()
                    K_all, V_all = torch.cat([K, Kp], dim=1), torch.cat([V, Vp], dim=0)
                try:
                    W_new, new_state[l] = self._solve(l, K_all, V_all, W)
                except NumericalError as exc:  # the solver's refusal (rlsedit.solvers.rls); say where
                    raise NumericalError(f"layer {l}: {exc}") from exc
                _check_finite(f"layers.{l}.W", W_new, ids)
                set_W(self.lm, l, W_new)
            tensors[f"layers.{l}.K"] = K.contiguous()
            tensors[f"layers.{l}.V"] = V.contiguous()
        info = {"target_loss": [float(x) for x in getattr(result, "losses", [])],
                "target_steps": [int(x) for x in getattr(result, "steps", [])],
                "seconds": clock.seconds}
        if logged is not None:
            info["targets_replayed"] = True
        return EditRecord(ids=ids, tensors=tensors, info=info), new_state

    def _logged_target(self, ids: tuple[str, ...], z: torch.Tensor | None, h: torch.Tensor,
                       logged: torch.Tensor | None) -> torch.Tensor:
        """``z = h + δ`` with ``h`` the current state at the top layer (before any write of this
        batch) and ``δ`` the log's: the stored one when the batch is replayed, else the one just
        found, as the log stores it (it may round it). A run and its replay then build ``z`` from
        the same ``δ`` and the same ``h``, so they write the same weights bit for bit."""
        if logged is None:
            logged = self.target_log.record(ids, z - h)
        if tuple(logged.shape) != tuple(h.shape):
            raise StateMismatchError(
                f"logged target residuals of shape {tuple(logged.shape)} for a batch of shape {tuple(h.shape)}")
        z = h + logged.to(device=h.device, dtype=h.dtype)
        _check_finite("value target z", z, ids)
        return z

    def _absolute_targets(self, layer: int, K: torch.Tensor, W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``V = KᵀW + R`` (u, d_v): the layer's current output plus its share of the residual.

        With a post-MLP norm (Gemma 3), the residual stream receives ``norm(v)``, not ``v``: the
        wanted stream value ``y* = norm(v) + R`` is mapped back through the norm by a fit
        (:mod:`rlsedit.locate.postnorm`) — exactly ``y*`` where the norm can reach it, the
        nearest output it can reach otherwise.
        """
        from ..locate.postnorm import value_through_norm

        current = K.T @ W  # (u, d_v)
        norm_path = self.lm.arch.post_mlp_norm
        if norm_path is None:
            return current + R
        bias = get_bias(self.lm, layer)
        out = current if bias is None else current + bias
        norm = resolve(block(self.lm, layer), norm_path)
        with torch.no_grad():
            wanted = norm(out) + R
        v_star = value_through_norm(norm, out, wanted)
        return v_star if bias is None else v_star - bias

    def _restore_weights(self, weights: dict[int, torch.Tensor]) -> None:
        for l, W in weights.items():
            set_W(self.lm, l, W)

    # ---- persistence --------------------------------------------------------------------------
    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors (not copies) the state file keeps: W_0, E[kkᵀ], the method's state."""
        out = {}
        for l in self.layers:
            out[f"layers.{l}.W0"] = self.W0[l]
            if l in self.moments:
                out[f"layers.{l}.mom2"] = self.moments[l]
        out.update(self.method_state_dict())
        return out

    def save_pretrained(self, directory) -> None:
        """Write config, state and edit history to ``directory`` (safetensors + JSON); see
        :mod:`rlsedit.editors.pretrained`."""
        from .pretrained import save_editor

        save_editor(self, directory)

    @classmethod
    def from_pretrained(cls, lm, directory, *, progress: bool = False) -> "Editor":
        """The editor saved in ``directory``, on ``lm`` (the unedited base model it was made on;
        its edited weights are written back into ``lm``). A folder made for another model or
        another method is refused."""
        from .pretrained import load_editor

        return load_editor(lm, directory, expected_class=None if cls is Editor else cls, progress=progress)

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this editor keeps in memory beside the model: what it saves, plus what a
        method rebuilds on load instead of saving (it overrides this to add them)."""
        return self._saved_tensors()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore this editor on the same base model: W_0, E[kkᵀ], the
        method's state, and each layer's current ``W`` copied out of the model."""
        out = {name: t.contiguous() for name, t in self._saved_tensors().items()}
        out.update({f"layers.{l}.W": get_W(self.lm, l) for l in self.layers})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], *, n_edits: int = 0, n_batches: int = 0) -> None:
        """Inverse of :meth:`state_dict`: restore ``W_0``, the method's state and each edited
        layer's ``W`` (written into the model); a state made for other layers or shapes raises
        :class:`~rlsedit.errors.StateMismatchError`."""
        self._prepare()
        # a state file is read onto the CPU; the editor's tensors live where the model's weights do
        tensors = {name: t.to(self.lm.device) for name, t in tensors.items()}
        for l in self.layers:
            for key in (f"layers.{l}.W0", f"layers.{l}.W"):
                if key not in tensors:
                    raise StateMismatchError(f"state has no tensor {key!r}; was it made for other layers?")
            if tuple(tensors[f"layers.{l}.W0"].shape) != tuple(self.W0[l].shape):
                raise StateMismatchError(
                    f"layer {l}: stored W0 has shape {tuple(tensors[f'layers.{l}.W0'].shape)}, "
                    f"the model's is {tuple(self.W0[l].shape)}")
        for l in self.layers:
            self.W0[l] = tensors[f"layers.{l}.W0"].clone()
            set_W(self.lm, l, tensors[f"layers.{l}.W"])
        self.load_method_state_dict(tensors)
        self.n_edits_ = n_edits
        self.n_batches_ = n_batches
        self.n_submitted_ = max(self.n_submitted_, n_edits)


class _PhaseClock:
    """Wall-clock seconds per named phase of a batch (``with clock("keys"): ...``), summed
    over repeats; synchronises the device first so asynchronous GPU work is charged to the
    phase that queued it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        return _Phase(self, phase)


class _Phase:
    def __init__(self, clock: _PhaseClock, phase: str) -> None:
        self.clock, self.phase = clock, phase

    def __enter__(self) -> None:
        synchronize(self.clock.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        synchronize(self.clock.device)
        self.clock.seconds[self.phase] = self.clock.seconds.get(self.phase, 0.0) + time.perf_counter() - self.start


def record_columns(record: EditRecord, layer: int, column: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys ``(d_k, n)`` and targets ``(n, d_v)`` a record gave the solve at ``layer``: its
    edits' own columns, then its preservation columns (``layers.<l>.Kp``/``Vp``, already scaled
    by √w; :mod:`rlsedit.locate.preserve`) when it has them. With ``column``, only edit
    ``column``'s: its own column and the preservation columns drawn for it (request-major)."""
    K, V = record.tensors[f"layers.{layer}.K"], record.tensors[f"layers.{layer}.V"]
    Kp, Vp = record.tensors.get(f"layers.{layer}.Kp"), record.tensors.get(f"layers.{layer}.Vp")
    if column is not None:
        K, V = K[:, column:column + 1], V[column:column + 1]
        if Kp is not None:
            count = Kp.shape[1] // len(record.ids)
            Kp, Vp = Kp[:, column * count:(column + 1) * count], Vp[column * count:(column + 1) * count]
    if Kp is None:
        return K, V
    return torch.cat([K, Kp], dim=1), torch.cat([V, Vp], dim=0)


def clone_state(state: Any) -> Any:
    """A deep copy of a per-layer solver state (so an uncommitted update never touches the live one)."""
    return copy.deepcopy(state)


def iter_batches(requests: Sequence[EditRequest], batch_size: int) -> Iterable[list[EditRequest]]:
    for start in range(0, len(requests), batch_size):
        yield list(requests[start:start + batch_size])
