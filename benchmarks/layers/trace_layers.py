"""Where do facts live? ROME-style causal tracing of the MLPs, per layer.

For known facts that the model completes correctly (greedy first token), the subject's token
embeddings are corrupted with Gaussian noise (``3 ×`` the standard deviation of subject-token
embeddings, as ROME), which destroys the answer's probability. Then, one condition at a time,
a clean activation at the subject's LAST token is restored in the corrupted run:

* ``mlp<w>``: the MLP down-projection outputs of a window of ``w`` layers centred on ``l``
  (ROME's window ``[l - w//2, l + w - w//2)``, clipped to the model); ``w = 1`` is one MLP;
* ``resid``: the residual stream (the output of block ``l``).

Indirect effect of a condition: ``IE = p_restored(answer) - p_corrupted(answer)``, averaged over
``--samples`` noise draws (the same draws for every condition) and then over facts (AIE).
Edit layers: the 5 consecutive layers whose joint MLP restoration (window 5) has the largest
effect, within the early-middle band (layers 1 .. ⌈2L/3⌉-1, see ``choose_layers``).

Run from the repository root (each takes a few minutes on 2 CPU cores):

    python3 benchmarks/layers/trace_layers.py --model smollm2
    python3 benchmarks/layers/trace_layers.py --model gemma3-270m

Writes ``benchmarks/layers/<model>.json``, ``<model>.md`` (table) and ``<model>.png`` (plot).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from rlsedit.model.arch import resolve  # noqa: E402
from rlsedit.model.hooks import edit_output  # noqa: E402
from rlsedit.model.load import load_model  # noqa: E402
from rlsedit.model.weights import block, down_proj  # noqa: E402

KNOWNS = ROOT / ".." / "shared" / "data" / "knowns" / "known_1000.json"
N_EDIT_LAYERS = 5


def subject_positions(tokenizer, prompt: str, subject: str) -> list[int]:
    """Token positions overlapping the subject's characters in ``prompt``."""
    start = prompt.index(subject)
    end = start + len(subject)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]


def answer_token(tokenizer, attribute: str) -> int:
    return tokenizer(" " + attribute, add_special_tokens=False)["input_ids"][0]


@torch.inference_mode()
def embedding_std(lm, knowns) -> float:
    """Standard deviation of the embedding-module output over every subject token (ROME)."""
    embed = resolve(lm.model, lm.arch.embed)
    rows = []
    for k in knowns:
        ids = torch.tensor([lm.tokenizer(k["subject"], add_special_tokens=False)["input_ids"]])
        rows.append(embed(ids)[0])
    return float(torch.cat(rows).std())


@torch.inference_mode()
def select_facts(lm, knowns, n_facts: int) -> list[dict]:
    """The first ``n_facts`` known facts whose greedy next token is the answer's first token."""
    chosen = []
    for k in knowns:
        if k["subject"] not in k["prompt"]:
            continue
        ids = lm.tokenizer(k["prompt"], return_tensors="pt")["input_ids"]
        logits = lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        target = answer_token(lm.tokenizer, k["attribute"])
        if int(logits.argmax()) == target:
            chosen.append(dict(k, answer_id=target))
            if len(chosen) == n_facts:
                break
    return chosen


def _block_hidden(output):
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def trace_fact(lm, fact, *, noise: float, samples: int, windows: list[int], seed: int) -> dict:
    """Answer probabilities: clean, corrupted, and restored per (condition, layer), for one fact.

    Conditions: one MLP-window restoration per entry of ``windows``, then the residual stream.
    """
    tok = lm.tokenizer
    L = lm.n_layers
    ids = tok(fact["prompt"], return_tensors="pt")["input_ids"]  # (1, T)
    subj = subject_positions(tok, fact["prompt"], fact["subject"])
    last = subj[-1]
    embed = resolve(lm.model, lm.arch.embed)

    # Clean run: the activations to restore, at the subject's last token.
    clean_mlp, clean_resid = {}, {}
    with ExitStack() as stack:
        for l in range(L):
            stack.enter_context(edit_output(down_proj(lm, l), _recorder(clean_mlp, l, last)))
            stack.enter_context(edit_output(block(lm, l), _recorder(clean_resid, l, last)))
        clean_logits = lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
    p_clean = float(clean_logits.softmax(-1)[fact["answer_id"]])

    # Row groups of `samples` rows: [corrupt] + [mlp window w at layer l, for w, l] + [resid at l].
    n_groups = 1 + L * len(windows) + L
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subj), lm.d_model, generator=gen) * noise
    draws = draws.repeat(n_groups, 1, 1)  # the same noise for every condition

    def corrupt(x):  # x: (rows, T, d_model) embedding output
        x = x.clone()
        x[:, subj] += draws.to(x.dtype)
        return x

    def group_rows(g):
        return list(range(samples * g, samples * (g + 1)))

    mlp_rows = {l: [] for l in range(L)}  # down_proj layer -> rows that restore it
    for w_index, w in enumerate(windows):
        for centre in range(L):
            rows = group_rows(1 + w_index * L + centre)
            for j in range(max(0, centre - w // 2), min(L, centre - (-w // 2))):
                mlp_rows[j].extend(rows)
    resid_rows = {l: group_rows(1 + len(windows) * L + l) for l in range(L)}

    with ExitStack() as stack:
        stack.enter_context(edit_output(embed, corrupt))
        for l in range(L):
            stack.enter_context(edit_output(down_proj(lm, l), _restorer(clean_mlp[l], mlp_rows[l], last)))
            stack.enter_context(edit_output(block(lm, l), _restorer(clean_resid[l], resid_rows[l], last)))
        batch = ids.expand(samples * n_groups, -1)
        probs = lm.model(input_ids=batch, logits_to_keep=1).logits[:, -1].softmax(-1)[:, fact["answer_id"]]
    probs = probs.reshape(n_groups, samples).mean(1).tolist()  # per condition, mean over noise
    out = {"p_clean": p_clean, "p_corrupt": probs[0], "subject_tokens": len(subj),
           "p_resid": probs[1 + len(windows) * L:]}
    for w_index, w in enumerate(windows):
        out[f"p_mlp{w}"] = probs[1 + w_index * L: 1 + (w_index + 1) * L]
    return out


def _recorder(store: dict, layer: int, position: int):
    def fn(y):
        store[layer] = _block_hidden(y)[0, position].clone()
        return y
    return fn


def _restorer(clean: torch.Tensor, rows: list[int], position: int):
    index = torch.tensor(rows)

    def fn(y):
        y = y.clone()
        y[index, position] = clean.to(y.dtype)
        return y
    return fn


def choose_layers(aie_window: list[float], n_layers: int) -> tuple[int, tuple[int, ...]]:
    """The 5 consecutive layers whose MLPs, restored together, carry the most effect.

    ``aie_window[c]`` is the effect of restoring the window of ``N_EDIT_LAYERS`` MLPs centred
    on ``c`` — exactly the candidate edit set ``c-2 .. c+2``. Candidates lie in the
    early-middle band: they start at block 1 or later and end before ``⌈2L/3⌉``. Block 0 is
    left out because its MLP alone restores much of the noised subject token (it acts as an
    extension of the embedding, see the single-layer curve); MEMIT's edit ranges also start
    above the first blocks (GPT-J 3-8, Llama-3-8B 4-8).
    """
    half = N_EDIT_LAYERS // 2
    band_end = max(N_EDIT_LAYERS + 1, math.ceil(2 * n_layers / 3))
    centres = range(1 + half, band_end - (N_EDIT_LAYERS - half) + 1)
    peak = max(centres, key=lambda c: aie_window[c])
    return peak, tuple(range(peak - half, peak - half + N_EDIT_LAYERS))


def summarise(traces: list[dict], n_layers: int, windows: list[int]) -> dict:
    n = len(traces)

    def mean_se(values):
        m = sum(values) / n
        var = sum((v - m) ** 2 for v in values) / max(n - 1, 1)
        return m, math.sqrt(var / n)

    out = {"n_facts": n}
    out["p_clean"], _ = mean_se([t["p_clean"] for t in traces])
    out["p_corrupt"], _ = mean_se([t["p_corrupt"] for t in traces])
    for kind in [f"mlp{w}" for w in windows] + ["resid"]:
        stats = [mean_se([t[f"p_{kind}"][l] - t["p_corrupt"] for t in traces]) for l in range(n_layers)]
        out[f"aie_{kind}"] = [s[0] for s in stats]
        out[f"se_{kind}"] = [s[1] for s in stats]
    return out


def write_outputs(name: str, summary: dict, meta: dict, out_dir: Path) -> None:
    L = meta["n_layers"]
    windows = meta["windows"]
    peak, chosen = meta["peak"], meta["chosen_layers"]
    kinds = [f"mlp{w}" for w in windows] + ["resid"]
    labels = {f"mlp{w}": (f"MLP, window {w}" if w > 1 else "MLP, single layer") for w in windows}
    labels["resid"] = "residual stream"
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    lines = [
        f"# Causal tracing: {name}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{summary['n_facts']} known facts answered correctly (greedy first token); noise σ = "
        f"{meta['noise']:.4g} (3 × subject-embedding std), {meta['samples']} noise draws per fact. "
        f"Mean p(answer): clean {summary['p_clean']:.3f}, corrupted {summary['p_corrupt']:.3f}. "
        f"Wall time {meta['seconds']:.0f} s on {meta['device']}.",
        "",
        f"Chosen edit layers: {', '.join(map(str, chosen))} — of all 5 consecutive layers inside "
        f"layers {meta['band'][0]}..{meta['band'][1] - 1}, the set whose MLPs restored together "
        f"(the {labels[meta['choose_from']]} curve, centred on layer {peak}) have the largest effect.",
        "",
        "AIE = mean over facts of p(answer | corrupted, one activation restored at the subject's last "
        "token) − p(answer | corrupted), ± standard error over facts.",
        "",
        "| layer | " + " | ".join(f"AIE {labels[k]} | ±" for k in kinds) + " | chosen |",
        "|---:|" + "---:|---:|" * len(kinds) + ":---:|",
    ]
    for l in range(L):
        cells = " | ".join(f"{summary['aie_' + k][l]:.4f} | {summary['se_' + k][l]:.4f}" for k in kinds)
        lines.append(f"| {l} | {cells} | {'✔' if l in chosen else ''} |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    xs = list(range(L))
    colours = ["tab:green", "tab:olive", "tab:cyan"]
    for i, kind in enumerate(kinds):
        colour = "tab:purple" if kind == "resid" else colours[i % len(colours)]
        m, se = summary[f"aie_{kind}"], summary[f"se_{kind}"]
        ax.plot(xs, m, marker="o", ms=3, label=labels[kind], color=colour)
        ax.fill_between(xs, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                        color=colour, alpha=0.2)
    ax.axvspan(chosen[0] - 0.5, chosen[-1] + 0.5, color="orange", alpha=0.2, label="chosen edit layers")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (restored at the subject's last token)")
    ax.set_ylabel("average indirect effect on p(answer)")
    ax.set_title(f"{name}: causal tracing over {summary['n_facts']} known facts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=120)
    plt.close(fig)


def replot(path: Path, out_dir: Path) -> int:
    saved = json.loads(path.read_text())
    meta, summary = saved["meta"], saved["summary"]
    peak, chosen = choose_layers(summary[f"aie_mlp{N_EDIT_LAYERS}"], meta["n_layers"])
    meta.update(peak=peak, chosen_layers=list(chosen), choose_from=f"mlp{N_EDIT_LAYERS}",
                band=[1, max(N_EDIT_LAYERS + 1, math.ceil(2 * meta["n_layers"] / 3))])
    write_outputs(meta["model"], summary, meta, out_dir)
    print(json.dumps({"model": meta["model"], "peak": peak, "chosen_layers": chosen}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--knowns", default=str(KNOWNS))
    parser.add_argument("--n-facts", type=int, default=50)
    parser.add_argument("--samples", type=int, default=3, help="noise draws per fact")
    parser.add_argument("--windows", default=f"1,{N_EDIT_LAYERS}",
                        help=f"MLP windows, comma-separated; must include {N_EDIT_LAYERS} "
                             "(the window the edit layers are chosen from)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: many small forwards; more threads thrash on a shared CPU)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--replot", metavar="JSON",
                        help="rebuild the table, plot and choice from a saved <model>.json (no model run)")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot), Path(args.out))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - start
    windows = [int(w) for w in args.windows.split(",")]
    if N_EDIT_LAYERS not in windows:
        parser.error(f"--windows must include {N_EDIT_LAYERS}")
    knowns = json.loads(Path(args.knowns).read_text())
    noise = 3 * embedding_std(lm, knowns)
    facts = select_facts(lm, knowns, args.n_facts)
    print(f"{args.model}: {len(facts)} facts, noise {noise:.4g}, windows {windows}", file=sys.stderr)
    traces = []
    for i, fact in enumerate(facts):
        traces.append(trace_fact(lm, fact, noise=noise, samples=args.samples, windows=windows,
                                 seed=args.seed * 100_003 + i))
        print(f"  {i + 1}/{len(facts)} {fact['prompt']!r} -> {fact['attribute']!r}", file=sys.stderr)
    summary = summarise(traces, lm.n_layers, windows)
    choose_from = f"mlp{N_EDIT_LAYERS}"
    peak, chosen = choose_layers(summary[f"aie_{choose_from}"], lm.n_layers)
    seconds = time.perf_counter() - start
    meta = {
        "model": args.model, "fingerprint": lm.fingerprint, "n_layers": lm.n_layers,
        "noise": noise, "samples": args.samples, "windows": windows, "seed": args.seed,
        "choose_from": choose_from, "band": [1, max(N_EDIT_LAYERS + 1, math.ceil(2 * lm.n_layers / 3))],
        "peak": peak, "chosen_layers": list(chosen), "seconds": seconds, "load_seconds": load_s,
        "device": f"{lm.device} ({torch.get_num_threads()} threads)",
        "facts": [{"known_id": f["known_id"], "prompt": f["prompt"], "attribute": f["attribute"]} for f in facts],
        "command": "python3 benchmarks/layers/trace_layers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(args.model, summary, meta, out_dir)
    print(json.dumps({"model": args.model, "peak": peak, "chosen_layers": chosen,
                      "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
