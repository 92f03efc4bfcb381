"""RLSEdit: the exact recursive least-squares editor over the whole stream.

Per edited layer the state is ``C_t = (λ²I + μ²A + Σ_i K_iK_iᵀ)⁻¹`` and ``W_t = W*_t``, the
minimiser of ``Σ_i ‖K_iᵀW − V_i‖² + λ²‖W − W_0‖² + μ²‖K_0ᵀ(W − W_0)‖²`` with ``A = K_0K_0ᵀ =
n·E[kkᵀ]``; each batch is one Woodbury step (:class:`~rlsedit.solvers.rls.RLSState`), so the
cost per batch is O(d_k²u) whatever the history. ``V`` are absolute targets (base class).
Undo is the exact downdate of the edit's column (with its preservation columns, if any:
:mod:`rlsedit.locate.preserve`).

``rlsedit-official`` reproduces the public code's behaviour for benchmarks: ``C`` restarts
from ``C_0`` each batch, and its residual subtracts ``KᵀW_prev`` from a value that already
is a residual (see :mod:`rlsedit.solvers.official`).
"""

from __future__ import annotations

import torch

from ..errors import InvalidRequestError, StateMismatchError
from ..model.weights import set_W
from ..solvers.official import official_update
from ..solvers.rls import RLSState
from .base import EditRecord, Editor, clone_state, record_columns
from .config import RLSEditConfig, RLSEditOfficialConfig


class RLSEdit(Editor):
    """The exact RLS editor; learned state ``states_[layer]`` is an :class:`RLSState`."""

    config_class = RLSEditConfig
    name = "rlsedit"
    supports_undo = True

    def _init_state(self) -> None:
        c = self.config
        dtype = getattr(torch, c.state_dtype)
        self.states_ = {
            l: RLSState.from_anchor(self.W0[l], self.anchor_weight * self.moments[l].double(),
                                    c.lambda_reg, c.mu_reg, dtype=dtype)
            for l in self.layers
        }

    def _solve(self, layer, K, V, W):
        state = clone_state(self.states_[layer])  # the live state changes only on commit
        state.update(K, V)
        return state.W_.to(W.dtype), state

    def _commit_state(self, new_state) -> None:
        self.states_.update(new_state)

    def propose_undo(self, record: EditRecord, column: int) -> "UndoProposal":
        """Compute the exact removal of edit ``record.ids[column]``: a downdate of its key/target
        column in every layer. Nothing changes until the returned proposal is committed."""
        if not 0 <= column < len(record.ids):
            raise InvalidRequestError(f"column {column} is outside the batch of {len(record.ids)} edits")
        new_states = {}
        for l in self.layers:
            K, V = record_columns(record, l, column)  # with the preservation rows drawn for it
            state = clone_state(self.states_[l])
            state.downdate(K, V)  # raises NumericalError, leaving the clone unused
            new_states[l] = state
        return UndoProposal(self, new_states)

    def method_state_dict(self):
        out = {}
        for l, state in self.states_.items():
            for key, value in state.state_dict().items():
                if key == "W0":
                    continue  # the state's W0 is the editor's layers.<l>.W0 in the state dtype
                # scalars (λ, μ, jitter, counters) as 0-d tensors: float64 round-trips them exactly
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
                out[f"layers.{l}.rls.{key}"] = value
        return out

    def load_method_state_dict(self, tensors):
        for l in self.layers:
            prefix = f"layers.{l}.rls."
            sub = {k[len(prefix):]: (v if v.dim() else v.item()) for k, v in tensors.items() if k.startswith(prefix)}
            W0 = self.W0[l]  # set from the file's layers.<l>.W0 by load_state_dict
            if "C" in sub:
                W0 = W0.to(sub["C"].dtype)  # as _init_state casts it
            old_copy = sub.setdefault("W0", W0)  # older state files hold it a second time
            if old_copy is not W0 and not (old_copy.dtype == W0.dtype and torch.equal(old_copy, W0)):
                raise StateMismatchError(
                    f"layer {l}: the RLS state's W0 differs from the editor's layers.{l}.W0; "
                    "the state file is inconsistent")
            state = RLSState.from_state_dict(sub)
            state.W0 = W0  # one W0 in memory, as after _init_state
            self.states_[l] = state

    def diagnostics(self):
        out = super().diagnostics()
        for l, state in self.states_.items():
            out[str(l)]["C_symmetry_error"] = float(state.symmetry_error())
            out[str(l)]["S_condition_last"] = state.last_s_condition()
        return out


class RLSEditOfficial(Editor):
    """The public RLSEdit code's update, kept only so benchmarks can show the difference.

    Learned state ``C0_[layer]``: ``C_0 = (λ²I + μ²A)⁻¹`` (d_k, d_k) in the config's state dtype,
    which every batch starts from again (the official code keeps no ``C`` across batches;
    :mod:`rlsedit.solvers.official`, point 1). It is rebuilt from ``E[kkᵀ]`` when the editor is
    prepared, so nothing beyond the base class's tensors is saved.
    """

    config_class = RLSEditOfficialConfig
    name = "rlsedit-official"

    def _init_state(self) -> None:
        c = self.config
        dtype = getattr(torch, c.state_dtype)
        # the C_0 RLSEdit starts its recursion from: same anchor, jitter rule and dtype
        self.C0_ = {
            l: RLSState.from_anchor(self.W0[l], self.anchor_weight * self.moments[l].double(),
                                    c.lambda_reg, c.mu_reg, dtype=dtype).C_
            for l in self.layers
        }

    def _solve(self, layer, K, V, W):
        i = self.layers.index(layer)
        share = len(self.layers) - i
        # The official code feeds V_t = z − h (the undivided residual) and then divides
        # (V_t − K_tᵀW_prev) by the remaining layer count; our V is KᵀW + (z − h)/share.
        residual = (V - K.T @ W) * share
        C0 = self.C0_[layer]
        return official_update(C0, W.to(C0.dtype), K.to(C0.dtype), residual.to(C0.dtype),
                               layers_left=share).to(W.dtype), None

    def held_tensors(self):
        # C_0 is rebuilt from E[kkᵀ] on load, so it is held but never saved
        return super().held_tensors() | {f"layers.{l}.C0": C for l, C in self.C0_.items()}


class UndoProposal:
    """A computed exact undo; ``commit`` writes the downdated weights and adopts the states."""

    def __init__(self, editor: RLSEdit, new_states: dict) -> None:
        self.editor, self.new_states = editor, new_states

    def commit(self) -> None:
        for l, state in self.new_states.items():
            set_W(self.editor.lm, l, state.W_.float())
        self.editor.states_.update(self.new_states)
        self.editor.n_edits_ -= 1
