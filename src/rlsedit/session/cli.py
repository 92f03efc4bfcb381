"""CLI subcommands over a lifelong session: demo, edit, ask, status, undo, export."""

from __future__ import annotations

import json
import math
import sys
import tempfile

from ..errors import InvalidRequestError
from ..locate.target_config import TARGET_BATCH_SIZE
from .session import Runtime, Session


def _runtime_args(p) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--cache-dir", default=None, help="cache for dequantized models and statistics "
                   "(default: ~/.cache/rlsedit)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--target-rows", type=int, default=None,
                   help="most token rows per forward pass of the value-target optimisation (default "
                        f"{TARGET_BATCH_SIZE}; wider passes suit a GPU; the targets do not depend on it beyond "
                        "float rounding)")


def _runtime(args, **extra) -> Runtime:
    return Runtime(device=args.device, cache_dir=args.cache_dir, progress=args.progress,
                   target_rows=args.target_rows, **extra)


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True))
    else:
        for key, value in obj.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {v}")
            else:
                print(f"{key}: {value}")


def register(sub) -> None:
    p = sub.add_parser("edit", help="apply a file of edits to a state directory (created if new)")
    p.add_argument("--state", required=True, help="state directory")
    p.add_argument("--edits", required=True, help="edit file (.jsonl or .json list)")
    p.add_argument("--model", default=None, help="model spec for a new state (default smollm2)")
    p.add_argument("--method", default=None, help="editor for a new state (default rlsedit)")
    p.add_argument("--batch-size", type=int, default=1, help="edits per batch")
    p.add_argument("--hparams", default=None, help="hyperparameters JSON (ours or an official hparams file), e.g. "
                   "{\"chat_prefix\": true} to also edit through the chat template")
    p.add_argument("--preset", default=None, help="a named setting, e.g. 'fast' (2 context prefixes, twice the "
                   "target step size: 1.8x faster per edit, benchmarks/SPEED.md); --hparams fields apply on top")
    p.add_argument("--corpus", default=None, help="text/JSONL corpus for E[kkᵀ] (new state only)")
    p.add_argument("--n", "--limit", dest="limit", type=int, default=None,
                   help="use only the first N records of the file (--limit is the old name)")
    p.add_argument("--skip-bad", action="store_true", help="skip and report bad edits instead of stopping")
    from ..eval.zsre import CONVENTIONS  # the CLI's one import from above session/: one list of conventions

    p.add_argument("--zsre-convention", choices=CONVENTIONS, default=None,
                   help="MEND zsRE files only: edit toward answers[0], '?' after locality prompts (memit, as the "
                        "MEMIT/AlphaEdit/RLSEdit tables) or toward alt (easyedit); default: alt, as the record reads. "
                        "rlsedit eval --state scores zsRE under the convention the state's edits followed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _runtime_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("ask", help="greedy completion and top-5 next tokens of the edited model")
    p.add_argument("--state", required=True, help="state directory (opened read-only)")
    p.add_argument("prompt", nargs="+", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=12, help="generation cap in tokens (default 12)")
    p.add_argument("--chat", action="store_true",
                   help="ask the prompt as the user turn of the model's chat template (an error if it has none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _runtime_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("status", help="model, method, edits applied, drift per layer, weights sha256")
    p.add_argument("--state", required=True, help="state directory (opened read-only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _runtime_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("undo", help="remove one earlier edit exactly (rlsedit only)")
    p.add_argument("--state", required=True, help="state directory")
    p.add_argument("--edit", required=True, help="edit id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _runtime_args(p)
    p.set_defaults(func=cmd_undo)

    p = sub.add_parser("export", help="write the edited model (HF checkpoint) or only the weight deltas")
    p.add_argument("--state", required=True, help="state directory (opened read-only)")
    p.add_argument("--out", default=None, help="new output directory")
    p.add_argument("--delta-only", action="store_true", help="only W − W_0 of the edited layers (safetensors)")
    p.add_argument("--lora", default=None, metavar="DIR", help="instead: the edits as a peft LoRA adapter in DIR")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: exact, the largest rank of ΔW)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _runtime_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="edit a few well-known facts on the embedded model; print before/after")
    p.add_argument("--model", default="smollm2", help="model spec (default smollm2)")
    p.add_argument("--method", default="rlsedit", help="editor (default rlsedit)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--state", default=None, help="keep the state here (default: a temporary directory)")
    p.add_argument("--corpus", default=None, help="text/JSONL corpus for E[kkᵀ] (default: the bundled Wikipedia sample)")
    _runtime_args(p)
    p.set_defaults(func=cmd_demo)


def _load_config(args):
    preset = args.preset
    if args.hparams is None and preset is None:
        return None
    from ..editors import get_editor_class
    from ..editors.config import preset_overrides

    config_class = get_editor_class(args.method or "rlsedit").config_class
    base = {} if preset is None else preset_overrides(preset)
    try:
        if args.hparams is None:
            return config_class.from_dict(base)
        return config_class.from_json_file(args.hparams, under=base)
    except InvalidRequestError:
        raise
    except ValueError as exc:  # a config's __post_init__ names the field and value
        raise InvalidRequestError(f"hparams file {args.hparams!r}: {exc}") from None


def cmd_edit(args) -> int:
    from ..requests import read_requests, read_requests_skipping_bad

    if args.batch_size <= 0:  # before the model loads
        raise InvalidRequestError(f"batch size must be a positive integer, got {args.batch_size}")
    # parse all first: a bad file changes nothing (with --skip-bad, bad records are reported)
    unreadable: list[dict[str, str]] = []
    if args.skip_bad:
        requests, unreadable = read_requests_skipping_bad(args.edits, limit=args.limit)
    else:
        requests = read_requests(args.edits, limit=args.limit)
    if args.zsre_convention is not None:
        from ..eval.zsre import is_mend_zsre_file, zsre_requests

        if not is_mend_zsre_file(args.edits):
            raise InvalidRequestError(f"--zsre-convention: {args.edits} does not hold MEND zsRE records (src, alt)")
        requests = zsre_requests(requests, args.zsre_convention)
    runtime = _runtime(args, corpus=args.corpus)
    with Session.open_or_create(args.state, model=args.model, method=args.method, config=_load_config(args),
                                runtime=runtime) as session:
        report = session.edit(requests, batch_size=args.batch_size, skip_bad=args.skip_bad)
        report.skipped[:0] = unreadable
        out = report.to_dict() | {"edits_total": len(session.index)}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"applied {out['applied']} edits ({out['already_applied']} already applied) "
              f"in {out['seconds']} s; {out['edits_total']} edits in {args.state}")
        for item in out["skipped"]:
            print(f"skipped {item['id']}: {item['error']}", file=sys.stderr)
    if out["skipped"] and not report.applied and not report.already_applied:
        print("rlsedit: error: every edit was skipped; nothing was applied", file=sys.stderr)
        return InvalidRequestError.exit_code
    return 0


def _ask(lm, prompt: str, max_new_tokens: int, *, chat: bool = False) -> dict:
    from ..eval.generation import chat_prompt
    from ..eval.decoding import greedy_generate
    from ..eval.scoring import next_token_topk

    text = chat_prompt(lm.tokenizer, prompt) if chat else prompt
    completion = greedy_generate(lm, [text], max_new_tokens=max_new_tokens)[0]
    top = next_token_topk(lm, text, 5)
    return {"prompt": prompt, "chat": chat, "completion": completion,
            "top5": [{"token": t.text, "prob": round(math.exp(t.logprob), 4)} for t in top]}


def cmd_ask(args) -> int:
    prompt = " ".join(args.prompt)
    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")
    with Session.open(args.state, runtime=_runtime(args), read_only=True) as session:
        out = _ask(session.lm, prompt, args.max_new_tokens, chat=args.chat)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    elif args.chat:
        print(f"user: {prompt}\nassistant: {out['completion'].strip()}")
        for item in out["top5"]:
            print(f"  {item['prob']:.4f}  {item['token']!r}")
    else:
        print(f"{prompt}{out['completion']}")
        for item in out["top5"]:
            print(f"  {item['prob']:.4f}  {item['token']!r}")
    return 0


def cmd_status(args) -> int:
    with Session.open(args.state, runtime=_runtime(args), read_only=True) as session:
        _print(session.status(), args.json)
    return 0


def cmd_undo(args) -> int:
    with Session.open(args.state, runtime=_runtime(args)) as session:
        session.undo(args.edit)
        out = {"undone": args.edit, "edits_total": len(session.index)}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"undid edit {args.edit}; {out['edits_total']} edits remain")
    return 0


def cmd_export(args) -> int:
    if args.lora is not None:
        return _export_lora(args)
    if args.out is None:
        raise InvalidRequestError("export needs --out DIR (a checkpoint or --delta-only) or --lora DIR")
    with Session.open(args.state, runtime=_runtime(args), read_only=True) as session:
        path = session.export(args.out, delta_only=args.delta_only)
    print(json.dumps({"wrote": str(path)}, indent=2, sort_keys=True) if args.json else f"wrote {path}")
    return 0


def _export_lora(args) -> int:
    from .lora import export_lora

    with Session.open(args.state, runtime=_runtime(args), read_only=True) as session:
        report = export_lora(session, args.lora, rank=args.rank)
    if args.json:
        print(json.dumps({"wrote": str(report.path), "rank": report.rank, "layers": report.layers},
                         indent=2, sort_keys=True, default=str))
        return 0
    print(f"wrote a rank-{report.rank} LoRA adapter to {report.path}")
    for layer, d in report.layers.items():
        print(f"  layer {layer}: rank(ΔW) {d['rank_delta']}, relative error {d['relative_error']:.3g}")
    return 0


DEMO_EDITS = [
    {"id": "eiffel", "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
     "target_new": "Rome"},
    {"id": "jordan", "prompt": "Michael Jordan is a professional", "subject": "Michael Jordan",
     "target_new": "baseball"},
    {"id": "einstein", "prompt": "Albert Einstein was born in the country of", "subject": "Albert Einstein",
     "target_new": "Canada"},
    {"id": "python", "prompt": "The Python programming language was created by", "subject": "Python",
     "target_new": "Linus"},
]
DEMO_UNRELATED = ["The capital of France is", "The Great Wall is located in"]


def _demo_verdict(target: str | None, before: dict, after: dict) -> str:
    """Whether an edit is now *said* (the greedy completion begins with the new object), or
    whether an unrelated prompt's completion stayed the same."""
    from ..eval.generation import begins_with, mentions

    if target is None:
        return "unchanged" if before["completion"] == after["completion"] else "CHANGED by the edits"
    if begins_with(after["completion"], target):
        return f"says it: the completion begins with {target!r}"
    if mentions(after["completion"], target):
        return f"mentions {target!r} but does not begin with it (not counted as said)"
    return f"does NOT say {target!r} (the edit did not reach generation)"


def cmd_demo(args) -> int:
    from ..editors import get_editor_class
    from ..requests import parse_request

    requests = [parse_request(r, i) for i, r in enumerate(DEMO_EDITS)]
    # A small E[kkᵀ] sample keeps the first run short; the statistics are cached afterwards.
    config = get_editor_class(args.method).config_class(mom2_n_samples=20_000)
    tmp = None
    state = args.state
    if state is None:
        tmp = tempfile.TemporaryDirectory(prefix="rlsedit-demo-")
        state = tmp.name
    say = (lambda *a, **k: None) if args.json else print  # --json: one object at the end, nothing else
    try:
        say(f"loading {args.model} and preparing the editor ({args.method}) ...", flush=True)
        with Session.create(state, model=args.model, method=args.method, config=config,
                            runtime=_runtime(args, corpus=args.corpus)) as session:
            prompts = [r.text for r in requests] + DEMO_UNRELATED
            before = [_ask(session.lm, p, 8) for p in prompts]
            report = session.edit(requests, batch_size=len(requests))
            after = [_ask(session.lm, p, 8) for p in prompts]
            say(f"applied {len(report.applied)} edits in {report.seconds:.1f} s "
                f"(layers {list(session.editor.layers)})\n")
            rows = []
            for i, (b, a) in enumerate(zip(before, after)):
                target = requests[i].target_new if i < len(requests) else None
                tag = f"edit -> {target!r}" if target is not None else "unrelated (should stay)"
                verdict = _demo_verdict(target, b, a)
                rows.append({"prompt": b["prompt"], "target_new": target, "before": b["completion"],
                             "after": a["completion"], "verdict": verdict})
                say(f"[{tag}] {b['prompt']}")
                say(f"    before: {b['completion'].strip()!r}")
                say(f"    after:  {a['completion'].strip()!r}")
                say(f"    {verdict}")
            from ..eval.generation import begins_with

            said = sum(begins_with(a["completion"], r.target_new) for r, a in zip(requests, after))
            say(f"\nsaid {said} of {len(requests)} edits (the greedy completion begins with the new object)")
            status = session.status()
            say(f"weights_sha256 {status['weights_sha256'][:16]}…, edits applied: {status['edits_applied']}")
        if args.json:
            print(json.dumps({"applied": len(report.applied), "said": said, "prompts": rows,
                              "weights_sha256": status["weights_sha256"]}, indent=2, sort_keys=True))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0
