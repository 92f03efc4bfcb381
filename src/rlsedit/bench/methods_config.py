"""What ``rlsedit bench methods`` runs: its config, and the runs it resolves into (methods,
hyperparameter files and the RLSEdit sweep)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from ..locate.target_config import TARGET_BATCH_SIZE
from .sweep import SWEEP_METHOD, parse_sweep, run_dir_name, sweep_run_name

log = logging.getLogger(__name__)

DEFAULT_METHODS: tuple[str, ...] = ("rlsedit", "rlsedit-official", "alphaedit", "memit", "rome", "ft")
GEN_CHAT = {"auto": None, "yes": True, "no": False}  # gen_chat -> GenerationConfig.chat
DEFAULT_CHECKPOINTS = 4


@dataclass(frozen=True)
class MethodBenchConfig:
    """What ``rlsedit bench methods`` runs. Every field has a default and help."""

    model: str = field(default="smollm2", metadata={"help": "model spec (smollm2, gemma3-270m, a directory, a .gguf)"})
    data: str = field(default="", metadata={"help": "edit file (CounterFact, any layout read_requests accepts)"})
    methods: tuple[str, ...] = field(default=DEFAULT_METHODS, metadata={"help": "methods, in the order run"})
    n: int = field(default=200, metadata={"help": "number of edits (the first N records of the file)"})
    batch_size: int = field(default=20, metadata={"help": "edits per batch"})
    checkpoints: int = field(default=DEFAULT_CHECKPOINTS, metadata={"help": "evaluations along the stream (the last batch is always one)"})
    checkpoint_edits: tuple[int, ...] = field(default=(), metadata={
        "help": "evaluate after the first batch whose cumulative edit count reaches each of these, e.g. "
                "500,1000,2000 (and after the last batch); instead of checkpoints"})
    retention_first: int = field(default=0, metadata={
        "help": "at every checkpoint, efficacy (and generation says-it) of the first N edits of the stream (0 = off)"})
    stop_below_chance: bool = field(default=False, metadata={
        "help": "stop a method once its last batch's efficacy is below chance (0.5) at two consecutive checkpoints"})
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
    sweep_only: bool = field(default=False, metadata={
        "help": "run the sweep's points alone, not the methods (one sweep point beside other runs of the same out "
                "in other processes)"})
    mom2_tokens: int | None = field(default=None, metadata={"help": "corpus tokens for E[kkᵀ] (overrides every method's mom2_n_samples)"})
    corpus: str | None = field(default=None, metadata={"help": "corpus for E[kkᵀ] (default: the session's default corpus)"})
    data_dir: str | None = field(default=None, metadata={"help": "folder of the general suites' data files, laid out as eval.runner.DATA_FILES"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    target_rows: int = field(default=TARGET_BATCH_SIZE, metadata={
        "help": "most token rows per forward pass of the value-target optimisation; how to run, not "
                "what is computed (not pinned by settings.json; each progress line's machine records it): larger "
                "passes suit a GPU"})
    cache_dir: str | None = field(default=None, metadata={"help": "model/statistics cache (default ~/.cache/rlsedit)"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per forward pass in evaluation"})
    gen_n: int = field(default=200, metadata={
        "help": "generation metrics on a seeded sample of this many edits (all when fewer; 0 = skip)"})
    gen_max_new_tokens: int = field(default=12, metadata={"help": "token cap of each generated continuation"})
    gen_chat: str = field(default="auto", metadata={
        "help": "ask through the chat template: auto (when the model has one), yes (error without one), no"})

    def __post_init__(self) -> None:
        for name in ("n", "batch_size", "checkpoints", "ppl_tokens", "retention_bins", "eval_batch_size",
                     "target_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        for name in ("general_n", "gsm8k_limit", "mom2_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise InvalidRequestError(f"{name} must be a positive integer or None, got {value!r}")
        if self.checkpoint_edits:
            if self.checkpoints != DEFAULT_CHECKPOINTS:
                raise InvalidRequestError(
                    f"checkpoints={self.checkpoints} and checkpoint_edits={list(self.checkpoint_edits)} both set "
                    "where checkpoints go; give one of them (--checkpoints K or --checkpoint-at E1,E2,…)")
            edits = tuple(self.checkpoint_edits)
            for value in edits:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise InvalidRequestError(f"checkpoint_edits must be positive integers, got {value!r}")
                if value > self.n:
                    raise InvalidRequestError(
                        f"checkpoint_edits: {value} edits lies beyond the stream's n={self.n} edits")
            object.__setattr__(self, "checkpoint_edits", tuple(sorted(set(edits))))
        if isinstance(self.retention_first, bool) or not isinstance(self.retention_first, int) \
                or not 0 <= self.retention_first <= self.n:
            raise InvalidRequestError(f"retention_first must be an integer in [0, n={self.n}], got {self.retention_first!r}")
        if not isinstance(self.stop_below_chance, bool):
            raise InvalidRequestError(f"stop_below_chance must be true or false, got {self.stop_below_chance!r}")
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
        if not isinstance(self.sweep_only, bool):
            raise InvalidRequestError(f"sweep_only must be true or false, got {self.sweep_only!r}")
        if self.sweep_only and not (self.sweep or "").strip():
            raise InvalidRequestError("sweep_only runs the sweep's points alone, but no sweep is given (--sweep)")
        if len(set(self.methods)) != len(self.methods):
            raise InvalidRequestError(f"methods: a method is named twice in {list(self.methods)}")
        if self.general and self.data_dir is None:
            raise InvalidRequestError("general suites need data_dir (--data-dir DIR: a folder laid out as eval.runner.DATA_FILES)")


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

    runs = [] if config.sweep_only else [MethodRun(m, m, base_config(m)) for m in config.methods]
    for point in parse_sweep(config.sweep):
        try:
            cfg = base_config(SWEEP_METHOD).replace(**point)
        except ValueError as exc:
            raise InvalidRequestError(f"sweep point {point}: {exc}") from None
        name = sweep_run_name(point)
        if name not in {r.name for r in runs}:
            runs.append(MethodRun(name, SWEEP_METHOD, cfg))
    return runs
