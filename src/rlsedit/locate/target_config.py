"""The settings of the value-target (``z``) optimisation: the one definition of their defaults,
help and checks.

:class:`TargetConfig` is what :func:`~rlsedit.locate.targets.compute_targets` and
:mod:`~rlsedit.locate.fasttargets` take. The editors' configs expose the settings a method
may change as flat fields under the names of the official MEMIT/AlphaEdit hparams files
(``v_num_grad_steps``, ``v_lr``, ``kl_factor``, …: :data:`HPARAMS_NAMES`), with the defaults,
help and checks defined here (``rlsedit.editors.config``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..config_checks import check_choice, check_int, check_number
from ..errors import InvalidRequestError
from ..requests import SUBJECT_SLOT

TARGET_DTYPES = ("float32", "bfloat16")
"""Precisions the model's weights can take during the optimisation."""

TARGET_BATCH_SIZE = 32
"""Most rows per group in :func:`~rlsedit.locate.targets.compute_targets` (rows are split evenly
over the fewest groups of at most this many); the default of the runtime's ``target_rows``.
Rows are aligned on their subject, so a group's replayed width is its longest subject-to-end
span whatever its size. Memory grows with the group, since autograd keeps a group's activations through every block
above the edited one; 32 rows kept a 2-core CPU's peak low at no loss of speed, and a GPU can
take far wider passes (benchmarks/speed/ARCHIVE.md, "Memory")."""

TARGET_METHODS = ("adam", "onestep", "verify")
"""Ways to find δ: :func:`~rlsedit.locate.targets.compute_targets`'s Adam loop, or the cheap
paths of :mod:`rlsedit.locate.fasttargets`."""


def _setting(default: Any, text: str, hparams: str | None = None) -> Any:
    """A field with its help; ``hparams``: its name in the editors' configs and hparams files."""
    metadata = {"help": text} if hparams is None else {"help": text, "hparams": hparams}
    return field(default=default, metadata=metadata)


@dataclass
class TargetConfig:
    """Hyperparameters of the target (``z``) optimisation.

    Defaults follow the official MEMIT/AlphaEdit configurations (``v_num_grad_steps`` 25,
    ``v_weight_decay`` 0.5, ``kl_factor`` 0.0625, ``clamp_norm_factor`` 0.75, early stop at
    loss 5e-2), plus an early stop on the target NLL alone (``early_stop_nll``). The step
    size defaults to the model family's (:attr:`~rlsedit.model.arch.Architecture.target_lr`:
    0.5, MEMIT's GPT-J and AlphaEdit's GPT-2 XL value; 2.0 for Gemma 3): Adam's step is per
    coordinate, so it bounds how fast ``δ`` can grow against subject states whose norm depends
    on the model (the choice on the val split: docs/TUNING.md).
    """

    steps: int = _setting(25, "maximum Adam steps on δ per request", "v_num_grad_steps")
    lr: float | None = _setting(
        None, "Adam learning rate on δ; None = the model family's (0.5; 2.0 for Gemma 3, whose hidden "
              "states are ~30x larger: docs/TUNING.md)", "v_lr")
    lr_scale: float = _setting(
        1.0, "factor on the Adam learning rate, the model family's when lr is unset (2.0 in the 'fast' preset: "
             "about a third fewer steps at the same bar, benchmarks/SPEED.md)", "v_lr_scale")
    weight_decay: float = _setting(0.5, "weight of ‖δ‖/‖h‖² in the loss (the norm, not squared)", "v_weight_decay")
    kl_factor: float = _setting(0.0625, "weight of the KL term on the kl_prompt ('{subject} is a')", "kl_factor")
    clamp_norm_factor: float = _setting(
        0.75, "δ is kept within clamp_norm_factor·‖h‖ after each step", "clamp_norm_factor")
    early_stop_loss: float = _setting(
        0.05, "a request stops once its whole loss is below this (0 disables)", "v_early_stop_loss")
    early_stop_nll: float = _setting(
        0.05, "a request also stops once its mean target NLL alone is below this (p(target) ≈ 0.95; 0 "
              "disables, MEMIT's rule): the test on the whole loss rarely fires on small models, where the KL "
              "term alone stays near 0.05", "v_early_stop_nll")
    early_stop_top1: bool = _setting(
        False, "a request also stops once every token of its target is the most probable token (teacher-forced) "
               "under every one of its prompts, i.e. the target is each prompt's greedy continuation: ENCORE's "
               "most-probable early stopping (MPES, arXiv 2502.01636); off = MEMIT's rules alone", "v_early_stop_top1")
    kl_prompt: str = _setting("{} is a", "prompt with '{}' for the subject on which the KL term is measured")
    dtype: str = _setting(
        "float32", "precision of the model's weights during the optimisation ('float32' or 'bfloat16'); δ, "
                   "the loss and h stay float32. bfloat16 runs the matrix products several times faster where "
                   "the processor has bf16 units (AMX, recent GPUs; benchmarks/SPEED.md); the batched path only",
        "v_dtype")
    method: str = _setting(
        "adam", "how δ is found: 'adam' (the Adam loop), 'onestep' (one gradient at δ = 0 and a line search "
                "along it, locate/fasttargets.py) or 'verify' (onestep, then Adam only for the requests it "
                "leaves short of accept_nll, starting from its δ)", "v_method")
    step_sizes: tuple[float, ...] = _setting(
        (0.15, 0.3, 0.45, 0.6, 0.75),
        "onestep/verify: the candidate ‖δ‖/‖h‖ of the line search (capped at clamp_norm_factor)")
    accept_nll: float = _setting(
        0.05, "onestep/verify: the line search takes the smallest step whose mean target NLL is below this; "
              "verify refines with Adam the requests no step brings below it", "v_accept_nll")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))

    def for_model(self, lm) -> "TargetConfig":
        """This config with the step size resolved: an unset ``lr`` replaced by the model family's,
        times ``lr_scale`` (then 1, so resolving twice changes nothing)."""
        if self.lr is not None and self.lr_scale == 1.0:
            return self
        lr = self.lr if self.lr is not None else lm.arch.target_lr
        return replace(self, lr=lr * self.lr_scale, lr_scale=1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


HPARAMS_NAMES = {f.metadata["hparams"]: f.name for f in fields(TargetConfig) if "hparams" in f.metadata}
"""The editors' (and official hparams files') name of each setting a method may change →
its :class:`TargetConfig` field. ``kl_prompt`` and ``step_sizes`` are not among them."""


def check_setting(name: str, value: Any, label: str | None = None) -> Any:
    """The checked, normalised value of :class:`TargetConfig` field ``name``; errors name the
    field as ``label`` (an editor config's ``v_*`` name) when given."""
    label = label or name
    if name == "steps":
        return check_int(label, value, at_least=1)
    if name in ("lr", "lr_scale", "clamp_norm_factor", "accept_nll"):
        return check_number(label, value, positive=True, optional=name == "lr")
    if name in ("weight_decay", "kl_factor", "early_stop_loss", "early_stop_nll"):
        return check_number(label, value)
    if name == "early_stop_top1":
        if not isinstance(value, bool):
            raise InvalidRequestError(f"{label} must be true or false, got {value!r}")
        return value
    if name == "dtype":
        return check_choice(label, value, TARGET_DTYPES)
    if name == "method":
        return check_choice(label, value, TARGET_METHODS)
    if name == "step_sizes":
        sizes = tuple(value) if isinstance(value, (tuple, list)) else ()
        if not sizes:
            raise InvalidRequestError(f"{label} must be a non-empty sequence of finite numbers > 0, got {value!r}")
        return tuple(sorted(check_number(label, v, positive=True) for v in sizes))
    if name == "kl_prompt":
        if not isinstance(value, str) or value.count(SUBJECT_SLOT) != 1:
            raise InvalidRequestError(f"{label} must be a string with exactly one '{{}}', got {value!r}")
        return value
    raise InvalidRequestError(f"{name!r} is not a value-target setting")
