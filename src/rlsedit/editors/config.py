"""Hyperparameters of the editors: one dataclass per method, every field with a default and help.

Configs are plain data: never mutated by an editor, saved as JSON (sorted keys) in a state
directory, and loadable from the official MEMIT/AlphaEdit/RLSEdit ``hparams/*.json`` files
(:meth:`EditConfig.from_dict` maps their keys; module-path keys are dropped because our
architecture table knows the modules).

The value-target settings (``v_num_grad_steps``, ``v_lr``, ``kl_factor``, …) are defined once,
in :class:`~rlsedit.locate.target_config.TargetConfig`: the fields here take their defaults,
help and checks from it, and :meth:`EditConfig.target_config` builds the ``TargetConfig``.
Invalid values raise :class:`~rlsedit.errors.InvalidRequestError` naming the field and value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config_checks import check_choice, check_int, check_number
from ..errors import InvalidRequestError
from ..locate.target_config import HPARAMS_NAMES, TargetConfig, check_setting

log = logging.getLogger(__name__)


def _help(text: str, default: Any = dataclasses.MISSING, **kw) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


_TARGET_FIELDS = {f.name: f for f in dataclasses.fields(TargetConfig)}


def _target(name: str, *, default: Any = dataclasses.MISSING, text: str | None = None) -> Any:
    """The field of value-target setting ``name`` (an official hparams key, e.g. ``v_lr``): the
    default and help of its :class:`TargetConfig` field unless a method overrides them."""
    source = _TARGET_FIELDS[HPARAMS_NAMES[name]]
    return _help("target optimization: " + (text or source.metadata["help"]),
                 source.default if default is dataclasses.MISSING else default)


def _json_form(value: Any) -> Any:
    """``value`` with every tuple a list, recursively: what a JSON round trip gives back."""
    if isinstance(value, dict):
        return {k: _json_form(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_form(v) for v in value]
    return value


OFFICIAL_ANCHOR_WEIGHT = 15_000.0  # mom2_update_weight of the official Llama-3-8B configs
OFFICIAL_ANCHOR_D_K = 14_336       # Llama-3-8B's MLP width (its key dimension)

# Keys of the official hparams files that our architecture table or runtime replaces.
_IGNORED_OFFICIAL_KEYS = {
    "model_name", "layer_selection", "fact_token", "v_loss_layer", "rewrite_module_tmp",
    "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
    "mom2_dataset", "mom2_dtype", "mom2_adjustment", "weight_reg", "K0_path_by_layer",
}


_WRITTEN_WHEN_SET = {"v_lr_scale": 1.0, "v_early_stop_top1": False, "chat_prefix": False, "paraphrase_count": 0,
                     "paraphrase_keys": False, "paraphrase_samples": 6,
                     "preserve_count": 0, "preserve_weight": 1.0, "preserve_subjects": None,
                     "preserve_positions": 0}
"""Fields :meth:`EditConfig.to_dict` writes only when they differ from their default."""


@dataclass(frozen=True)
class EditConfig:
    """What every key/value editor shares: where to edit and how value targets are found."""

    method: ClassVar[str] = ""
    no_key_columns: ClassVar[str | None] = None
    """Why a method has no least squares over key columns to add preservation rows to (None: it has)."""

    layers: tuple[int, ...] | None = _help(
        "edited layers (ascending); None = the model's default layers", None)
    v_num_grad_steps: int = _target("v_num_grad_steps")
    v_lr: float | None = _target("v_lr")
    v_lr_scale: float = _target("v_lr_scale")
    v_weight_decay: float = _target("v_weight_decay")
    kl_factor: float = _target("kl_factor")
    clamp_norm_factor: float = _target("clamp_norm_factor")
    v_early_stop_loss: float = _target("v_early_stop_loss")
    v_early_stop_nll: float = _target("v_early_stop_nll")
    v_early_stop_top1: bool = _target("v_early_stop_top1")
    v_dtype: str = _target("v_dtype")
    v_method: str = _target("v_method")
    v_accept_nll: float = _target("v_accept_nll")
    context_count: int = _help("number of generated context prefixes (plus the empty one)", 5)
    context_length: int = _help("length in tokens of each generated context prefix", 10)
    key_average: str = _help(
        "how a key is averaged over the prefixes: 'per_type' (MEMIT/AlphaEdit/RLSEdit compute_ks: the bare "
        "prompt weighs 1/2, each generated prefix 1/2 over their count) or 'uniform' (1/P each)", "per_type")
    chat_prefix: bool = _help(
        "also fit keys and value targets with the prompt as the user turn of the tokenizer's chat template (one "
        "more context prefix, the target after the assistant's header), so the fact transfers to chat use of an "
        "instruct model; an error for a model without a chat template. In the key average it joins the generated "
        "prefixes ('per_type': the bare prompt keeps 1/2)", False)
    paraphrase_count: int = _help(
        "also fit each value target under this many of the model's own rewordings of the edit's prompt (sampled "
        "few-shot, kept when they hold the subject and ask for the same kind of answer; rlsedit.locate.paraphrases), "
        "so the fact is said when asked another way; 0 = off. Keys are unchanged unless paraphrase_keys is set. "
        "Only for the batch key/value editors (not ROME, FT)", 0)
    paraphrase_keys: bool = _help(
        "also average each key over the rewording rows (needs paraphrase_count > 0): the rewordings are one more "
        "type in a 'per_type' average (bare, generated prefixes, rewordings: 1/3 each), rows alike in 'uniform'", False)
    paraphrase_samples: int = _help(
        "rewordings sampled per edit before the checks pick paraphrase_count of them (at least paraphrase_count; "
        "places left when fewer pass are filled with the edit's own prompt)", 6)
    mom2_n_samples: int = _help("corpus tokens used for the key second moment E[kk^T]", 100_000)
    mom2_update_weight: float | None = _help(
        "n: the anchor Gram is n * E[kk^T]; None = 15000 * d_k / 14336, the official Llama-3-8B value "
        "scaled to the model's key width (see anchor_weight)", None)
    seed: int = _help("seed for anything random (context prefixes, rewordings, preservation subjects)", 0)
    preserve_count: int = _help(
        "preservation rows per edit: the edit's prompt template filled with this many other subjects, whose "
        "current layer output joins the batch's least-squares solve as a target to keep (rlsedit.locate.preserve); "
        "0 = off. Only for methods that solve a least squares over key columns (not ROME, FT)", 0)
    preserve_weight: float = _help(
        "w > 0: weight of each preservation row in the least squares (its key and target scaled by sqrt(w))", 1.0)
    preserve_positions: int = _help(
        "0: each preservation prompt gives one row, at its subject's last token; P > 0: P rows, at the prompt's "
        "last P token positions (subject and relation tokens alike, zero rows where the prompt is shorter), since "
        "a prompt's continuation reads every earlier position's layer output through attention; the journal "
        "then stores P times as many preservation rows", 0)
    preserve_subjects: str | None = _help(
        "where preservation subjects come from: a JSON list of strings, or JSON/JSONL records with a \"subject\" "
        "(ROME's known_1000.json) or \"title\" field; None = the page titles of the bundled corpus", None)

    def __post_init__(self) -> None:
        if self.layers is not None:
            try:
                layers = tuple(operator.index(x) for x in self.layers if not isinstance(x, bool))
            except TypeError:
                layers = ()
            if not layers or len(layers) != len(self.layers) or any(x < 0 for x in layers) \
                    or list(layers) != sorted(set(layers)):
                raise InvalidRequestError(
                    f"layers must be distinct non-negative ascending ints, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        for name, target_name in HPARAMS_NAMES.items():
            object.__setattr__(self, name, check_setting(target_name, getattr(self, name), label=name))
        check_int("context_count", self.context_count, at_least=0)
        check_int("context_length", self.context_length, at_least=1)
        check_int("mom2_n_samples", self.mom2_n_samples, at_least=1)
        check_choice("key_average", self.key_average, ("per_type", "uniform"))
        if not isinstance(self.chat_prefix, bool):
            raise InvalidRequestError(f"chat_prefix must be true or false, got {self.chat_prefix!r}")
        check_int("paraphrase_count", self.paraphrase_count, at_least=0)
        if self.paraphrase_count and self.no_key_columns:
            raise InvalidRequestError(f"paraphrase_count={self.paraphrase_count}: only the batch key/value editors "
                                      "take rewording rows; use rlsedit, memit, memit-seq or alphaedit")
        if not isinstance(self.paraphrase_keys, bool):
            raise InvalidRequestError(f"paraphrase_keys must be true or false, got {self.paraphrase_keys!r}")
        if self.paraphrase_keys and not self.paraphrase_count:
            raise InvalidRequestError("paraphrase_keys needs rewordings to average over: set paraphrase_count > 0")
        check_int("paraphrase_samples", self.paraphrase_samples, at_least=1)
        if self.paraphrase_samples < self.paraphrase_count:
            raise InvalidRequestError(f"paraphrase_samples={self.paraphrase_samples} cannot yield paraphrase_count="
                                      f"{self.paraphrase_count} rewordings: sample at least as many as are kept")
        object.__setattr__(self, "mom2_update_weight",
                           check_number("mom2_update_weight", self.mom2_update_weight, optional=True))
        check_int("preserve_count", self.preserve_count, at_least=0)
        if self.preserve_count and self.no_key_columns:
            raise InvalidRequestError(f"preserve_count={self.preserve_count}: {self.no_key_columns}; "
                                      "use rlsedit, memit, memit-seq or alphaedit")
        object.__setattr__(self, "preserve_weight", check_number("preserve_weight", self.preserve_weight, positive=True))
        check_int("preserve_positions", self.preserve_positions, at_least=0)
        if self.preserve_positions and not self.preserve_count:
            raise InvalidRequestError(f"preserve_positions={self.preserve_positions} needs preservation prompts: "
                                      "set preserve_count > 0")
        if isinstance(self.preserve_subjects, Path):
            object.__setattr__(self, "preserve_subjects", str(self.preserve_subjects))
        if self.preserve_subjects is not None and (not isinstance(self.preserve_subjects, str)
                                                   or not self.preserve_subjects.strip()):
            raise InvalidRequestError(
                f"preserve_subjects must be a file path or None, got {self.preserve_subjects!r}")

    def target_config(self) -> TargetConfig:
        """The value-target settings as the :class:`TargetConfig` the optimisation takes (an
        unset ``v_lr`` stays None: :meth:`TargetConfig.for_model` picks the model family's)."""
        return TargetConfig(**{target_name: getattr(self, name) for name, target_name in HPARAMS_NAMES.items()})

    def anchor_weight(self, d_k: int) -> float:
        """``n`` of the anchor ``n·E[kkᵀ]`` for a model with key width ``d_k``.

        Why scale with ``d_k``: for a key drawn like the corpus keys, ``kᵀ(n·E[kkᵀ])⁻¹k ≈ d_k/n``,
        and one edit realises the fraction ``s/(1+s)`` of its residual with ``s = kᵀ(nE)⁻¹k``
        (Woodbury). The official configs use n = 15000 at Llama-3-8B's d_k = 14336 (s ≈ 1);
        keeping ``d_k/n`` gives every model the same per-edit balance between fitting the edit
        and holding the corpus keys. On SmolLM2 (d_k 1536) the CounterFact val split agrees:
        n = 15000 made 25% of 20 edits the argmax, n = 1500 made 90% (docs/TUNING.md).
        """
        if self.mom2_update_weight is not None:
            return float(self.mom2_update_weight)
        return OFFICIAL_ANCHOR_WEIGHT * d_k / OFFICIAL_ANCHOR_D_K

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as JSON holds it (tuples as lists), so a saved copy compares equal. Fields
        added after states were first saved (:data:`_WRITTEN_WHEN_SET`) are left out at their
        default, so a state saved before them still compares equal to a config with the default."""
        data = _json_form(dataclasses.asdict(self))
        for name, default in _WRITTEN_WHEN_SET.items():
            if data.get(name) == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditConfig":
        """Build from our own dict or an official hparams dict; unknown keys are dropped with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, dropped = {}, []
        for key, value in data.items():
            if key in names:
                kwargs[key] = tuple(value) if key == "layers" and value is not None else value
            elif key not in _IGNORED_OFFICIAL_KEYS and key != "method":
                dropped.append(key)
        if dropped:
            log.warning("%s: ignoring unknown hyperparameters %s", cls.__name__, sorted(dropped))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise InvalidRequestError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path, *, under: dict[str, Any] | None = None) -> "EditConfig":
        """The config a hparams file describes; ``under``: fields it starts from (e.g. a
        preset's), which the file's own fields override."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"hparams file {str(path)!r}: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRequestError(f"hparams file {str(path)!r}: expected a JSON object")
        try:
            return cls.from_dict({**(under or {}), **data})
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"hparams file {str(path)!r}: {exc}") from None

    def replace(self, **changes) -> "EditConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "EditConfig":
        """The config of a named setting (:data:`PRESETS`), ``overrides`` on top; e.g.
        ``RLSEditConfig.preset("fast")``."""
        return cls.from_dict({**preset_overrides(name), **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"context_count": 2, "v_lr_scale": 2.0},
}
"""Named settings of the value-target optimisation, each a dict of config fields.

``fast``: two generated context prefixes instead of five (4 rows per edit in every Adam step
instead of 7) and twice the family's step size (about a third fewer steps to the same bar).
1.76× less time per edit than the defaults on 1,000 SmolLM2 CounterFact edits, teacher-forced
efficacy / generalization / specificity within 1.6 points and "says it" equal, chat answers
mentioning the new object 4 points less (benchmarks/SPEED.md). Not the default: the defaults
are the authors' (MEMIT's compute_z), which every key/value method here shares."""


def preset_overrides(name: str) -> dict[str, Any]:
    """The fields preset ``name`` sets (a copy); an unknown name is an error listing the known ones."""
    if name not in PRESETS:
        raise InvalidRequestError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])


@dataclass(frozen=True)
class RLSEditConfig(EditConfig):
    """RLSEdit: the exact recursion over the whole stream (``lambda_reg`` = λ, ``mu_reg`` = μ)."""

    method: ClassVar[str] = "rlsedit"
    lambda_reg: float = _help("λ: pull toward W_0 in weight space (λ²||W − W_0||²)", 0.0)
    mu_reg: float = _help("μ: pull toward W_0 on corpus keys (μ²||K_0ᵀ(W − W_0)||²)", 1.0)
    state_dtype: str = _help("dtype of the recursion state C, W: float32 or float64", "float32")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lambda_reg", "mu_reg"):
            object.__setattr__(self, name, check_number(name, getattr(self, name)))
        check_choice("state_dtype", self.state_dtype, ("float32", "float64"))


@dataclass(frozen=True)
class RLSEditOfficialConfig(RLSEditConfig):
    """The public RLSEdit code's behaviour (C reset per batch, residual − KᵀW_prev); benchmarks only."""

    method: ClassVar[str] = "rlsedit-official"


@dataclass(frozen=True)
class MEMITConfig(EditConfig):
    """MEMIT: ΔW = (n·E[kkᵀ] + KKᵀ)⁻¹ K R per batch, no memory of earlier batches."""

    method: ClassVar[str] = "memit"


@dataclass(frozen=True)
class MEMITSeqConfig(EditConfig):
    """Sequential MEMIT with the accumulated Gram of past keys (AlphaEdit code base's MEMIT_seq)."""

    method: ClassVar[str] = "memit-seq"


@dataclass(frozen=True)
class AlphaEditConfig(EditConfig):
    """AlphaEdit: MEMIT's update projected onto the null space of the corpus keys."""

    method: ClassVar[str] = "alphaedit"
    nullspace_threshold: float | None = _help(
        "absolute rule (official hparams files: 2e-2): eigenvalues of E[kk^T] below this span the null space; "
        "None = the relative rule of nullspace_energy", None)
    nullspace_energy: float = _help(
        "relative rule: the null space is the most small eigenvectors of E[kk^T] whose eigenvalues sum to at "
        "most this fraction of tr(E[kk^T]), so ||P K_0||^2/||K_0||^2 <= this (AlphaEdit assumes P K_0 = 0)", 1e-2)
    L2: float = _help("ridge on the projected normal equations", 10.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "nullspace_threshold",
                           check_number("nullspace_threshold", self.nullspace_threshold, optional=True))
        if not check_number("nullspace_energy", self.nullspace_energy) < 1:
            raise InvalidRequestError(f"nullspace_energy must be in [0, 1), got {self.nullspace_energy!r}")
        check_number("L2", self.L2, positive=True)


@dataclass(frozen=True)
class ROMEConfig(EditConfig):
    """ROME: one rank-one update per request at a single layer."""

    method: ClassVar[str] = "rome"
    no_key_columns: ClassVar[str | None] = (
        "ROME's rank-one update has no least squares over key columns to add preservation rows to")
    layers: tuple[int, ...] | None = _help("the single edited layer; None = the middle default layer", None)
    v_weight_decay: float = _target(
        "v_weight_decay", text="weight of ‖δ‖/‖m‖², m the edited MLP's output at the subject (ROME compute_v)")
    clamp_norm_factor: float = _target(
        "clamp_norm_factor", default=4.0,
        text="δ is kept within clamp_norm_factor·‖m‖, m the edited MLP's output at the subject (ROME's "
             "clamp_norm_factor)")
    context_template_length_params: tuple[tuple[int, int], ...] = _help(
        "ROME's context prefixes: (length in tokens, count) pairs sampled from the end-of-text token, after the "
        "bare prompt ([[5,10],[10,10]]: 21 prefixes); context_count and context_length are not used", ((5, 10), (10, 10)))
    key_average: str = _help("how the left vector's key is averaged over the prefixes: 'uniform' (ROME compute_u) "
                             "or 'per_type'", "uniform")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and len(self.layers) != 1:
            raise InvalidRequestError(f"ROME edits exactly one layer, got layers={self.layers!r}")
        try:
            pairs = tuple((int(length), int(count)) for length, count in self.context_template_length_params)
        except (TypeError, ValueError):
            raise InvalidRequestError("context_template_length_params must be (length, count) pairs, got "
                                      f"{self.context_template_length_params!r}") from None
        if not pairs or any(length < 2 or count < 1 for length, count in pairs):
            raise InvalidRequestError("context_template_length_params needs lengths >= 2 and counts >= 1, got "
                                      f"{self.context_template_length_params!r}")
        object.__setattr__(self, "context_template_length_params", pairs)


@dataclass(frozen=True)
class FTConfig(EditConfig):
    """FT-L: fine-tune the edited layers' down projections on the target NLL, within an ℓ∞ ball around
    each batch's starting weights."""

    method: ClassVar[str] = "ft"
    no_key_columns: ClassVar[str | None] = (
        "FT fine-tunes on the target NLL and solves no least squares over key columns")
    lr: float = _help("Adam learning rate on the weights", 5e-4)
    num_steps: int = _help("optimization steps per batch", 25)
    norm_constraint: float = _help(
        "ℓ∞ radius, around the weights at the start of each batch (ft_main's weights_copy), that the "
        "weights are clamped to", 5e-4)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_steps", self.num_steps, at_least=1)
        if self.chat_prefix:
            raise InvalidRequestError("chat_prefix is for the key/value editors; FT fine-tunes on the bare prompts")
        for name in ("lr", "norm_constraint"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), positive=True))
