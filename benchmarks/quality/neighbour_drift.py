"""What "neighbour continuation unchanged" measures: real edits against random weight changes of the same size.

One rlsedit stream (defaults) over the first N ROME-layout CounterFact records; after 1, 5, 20 and N
edits, the greedy continuations (12 tokens, stop at "." or a newline: eval/generation.py's
settings) of *all N records'* neighbourhood prompts are compared with the unedited model's: the
whole continuation, its first normalised word, and whether it mentions any edited record's new
object. Then the edited layers are reset and a Gaussian random change of the same per-layer
Frobenius norm as the 1-edit and the N-edit ΔW (and 1/10 of the 1-edit one) is applied instead.
If random changes alter as many continuations as the edits, the figure measures the size of the
weight change, not where the edits write.

    OMP_NUM_THREADS=1 python benchmarks/quality/neighbour_drift.py [N] [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from rlsedit import RLSEdit, RLSEditConfig, load_model
from rlsedit.eval.generation import STOP_STRINGS, GenerationConfig, first_word, mentions
from rlsedit.eval.decoding import greedy_generate
from rlsedit.requests import read_requests

DATA = Path(os.environ.get("RLSEDIT_DATA", Path(__file__).resolve().parents[3] / "shared/data")) \
    / "counterfact/counterfact-rome-format.json"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / f"smollm2-rome-n{n}-neighbour-drift"
    torch.manual_seed(0)
    requests = read_requests(DATA, limit=n)
    lm = load_model("smollm2")
    prompts = list(dict.fromkeys(p for r in requests for p in r.neighborhood))
    new_objects = sorted({r.target_new for r in requests})

    def generate() -> list[str]:
        return greedy_generate(lm, prompts, GenerationConfig().max_new_tokens, stop=STOP_STRINGS, batch_size=16)

    before = generate()

    def compare(after: list[str]) -> dict[str, float]:
        k = len(prompts)
        return {"unchanged": sum(a == b for a, b in zip(after, before)) / k,
                "first_word_unchanged": sum(first_word(a) == first_word(b) for a, b in zip(after, before)) / k,
                "mentions_a_new_object": sum(any(mentions(a, o) for o in new_objects) for a in after) / k}

    all_down = {l: block.mlp.down_proj for l, block in enumerate(lm.model.model.layers)}
    w0 = {l: m.weight.detach().clone() for l, m in all_down.items()}
    editor = RLSEdit(lm, RLSEditConfig())
    editor.partial_fit(requests[:1])
    modules = {l: m for l, m in all_down.items() if not torch.equal(m.weight.detach(), w0[l])}  # the edited band
    w0 = {l: w0[l] for l in modules}
    delta = {}
    rows = {"unedited baseline (texts)": {"prompts": len(prompts),
                                          "mentions_a_new_object": compare(before)["mentions_a_new_object"]}}
    done = 1
    for upto in (1, 5, 20, n):
        if upto > done:
            for i in range(done, upto, 20):
                editor.partial_fit(requests[i:min(i + 20, upto)])
            done = upto
        t = time.time()
        delta[upto] = {l: (m.weight.detach() - w0[l]).clone() for l, m in modules.items()}
        rows[f"{upto} real edits"] = compare(generate())
        rows[f"{upto} real edits"]["weight_change_norm"] = {str(l): float(d.norm()) for l, d in delta[upto].items()}
        print(upto, rows[f"{upto} real edits"], f"{time.time() - t:.0f}s", flush=True)
    for label, upto, scale in (("random, norm of 1 edit", 1, 1.0), ("random, 1/10 the norm of 1 edit", 1, 0.1),
                               (f"random, norm of {n} edits", n, 1.0)):
        with torch.no_grad():
            for l, m in modules.items():
                r = torch.randn_like(w0[l])
                m.weight.copy_(w0[l] + r * (scale * delta[upto][l].norm() / r.norm()))
        rows[label] = compare(generate())
        print(label, rows[label], flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"n": n, "data": DATA.name, "model": "smollm2", "config": "RLSEditConfig() defaults", "edited_layers": sorted(modules),
              "neighbour_prompts": len(prompts), "batches": "1, 4, 15, then 20 at a time", "seed": 0,
              "torch": torch.__version__, "rows": rows}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| | neighbour continuation unchanged | first word unchanged | mentions an edited new object |",
             "|---|---:|---:|---:|"]
    for label, row in rows.items():
        cells = [f"{100 * row[k]:.1f}" if k in row else "–"
                 for k in ("unchanged", "first_word_unchanged", "mentions_a_new_object")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (out_dir / "result.md").write_text(f"{len(prompts)} neighbourhood prompts of the first {n} ROME-layout "
                                       "records, SmolLM2, rlsedit defaults\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
