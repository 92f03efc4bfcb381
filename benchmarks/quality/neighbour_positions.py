"""Where the edits reach the neighbour prompts: ΔW applied at some token positions only.

One rlsedit stream (defaults, batches of 20) over the first N ROME-layout CounterFact records.
Then the neighbourhood prompts of all N records are decoded greedily (eval/generation.py's
settings: 12 tokens, stop at "." or a newline) with each edited down-projection computing

    out = x W₀ᵀ + m_t · x ΔWᵀ,      ΔW = W − W₀,  m_t ∈ {0, 1} per token position t

for these masks: every position (the edited model), the prompt's positions only (the prefill),
its last position only (the one whose output picks the first new token), the prompt's positions
but the last, and the generated positions only (the decoding steps after the prefill). The first
new token depends on the prefill alone, so "first word unchanged" under "generated positions
only" is the unedited model's by construction. If a neighbour's continuation changes mostly
through the generated positions, preservation rows at the subject's last token cannot reach it;
if through the prompt's last position, rows there can.

    OMP_NUM_THREADS=2 python benchmarks/quality/neighbour_positions.py [N] [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlsedit import RLSEdit, RLSEditConfig, load_model
from rlsedit.eval.decoding import greedy_generate
from rlsedit.eval.generation import STOP_STRINGS, GenerationConfig, first_word
from rlsedit.requests import read_requests

DATA = Path(os.environ.get("RLSEDIT_DATA", Path(__file__).resolve().parents[3] / "shared/data")) \
    / "counterfact/counterfact-rome-format.json"

# mask(prefill?, T) -> (T,) of 0/1 over the call's positions; a decoding step has T = 1
MASKS = {
    "every position (the edited model)": lambda prefill, T: torch.ones(T),
    "the prompt's positions only": lambda prefill, T: torch.ones(T) if prefill else torch.zeros(T),
    "the prompt's last position only": lambda prefill, T: (torch.arange(T) == T - 1).float() if prefill else torch.zeros(T),
    "the prompt's positions but the last": lambda prefill, T: (torch.arange(T) < T - 1).float() if prefill else torch.zeros(T),
    "the generated positions only": lambda prefill, T: torch.zeros(T) if prefill else torch.ones(T),
}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / f"smollm2-rome-n{n}-neighbour-positions"
    torch.manual_seed(0)
    requests = read_requests(DATA, limit=n)
    lm = load_model("smollm2")
    prompts = list(dict.fromkeys(p for r in requests for p in r.neighborhood))
    # every prompt must reach the hook as a prefill of more than one token, or the two phases blur
    assert min(len(lm.tokenizer(p)["input_ids"]) for p in prompts) > 1

    def generate() -> list[str]:
        return greedy_generate(lm, prompts, GenerationConfig().max_new_tokens, stop=STOP_STRINGS, batch_size=16)

    t0 = time.time()
    before = generate()
    downs = {l: block.mlp.down_proj for l, block in enumerate(lm.model.model.layers)}
    w0 = {l: m.weight.detach().clone() for l, m in downs.items()}
    editor = RLSEdit(lm, RLSEditConfig())
    for i in range(0, n, 20):
        editor.partial_fit(requests[i:i + 20])
    edited = {l: m for l, m in downs.items() if not torch.equal(m.weight.detach(), w0[l])}
    print(f"{n} edits on layers {sorted(edited)} in {time.time() - t0:.0f}s", flush=True)

    def compare(after: list[str]) -> dict[str, float]:
        k = len(prompts)
        return {"unchanged": sum(a == b for a, b in zip(after, before)) / k,
                "first_word_unchanged": sum(first_word(a) == first_word(b) for a, b in zip(after, before)) / k}

    rows = {}
    def masked(l, mask_of):
        def hook(module, inputs, output):
            x = inputs[0]
            T = x.shape[1]
            m = mask_of(T > 1, T).bool().view(1, T, 1)
            return torch.where(m, output, F.linear(x, w0[l]))  # exact: output where m, else x W₀ᵀ
        return hook

    for label, mask_of in MASKS.items():
        handles = [m.register_forward_hook(masked(l, mask_of)) for l, m in edited.items()]
        try:
            rows[label] = compare(generate())
        finally:
            for h in handles:
                h.remove()
        print(label, rows[label], flush=True)
    # the hooks must not have changed the weights: the edited model decodes as before the hooks
    assert compare(generate()) == rows["every position (the edited model)"]
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"n": n, "data": DATA.name, "model": "smollm2", "config": "RLSEditConfig() defaults, batches of 20",
              "edited_layers": sorted(edited), "neighbour_prompts": len(prompts), "seed": 0,
              "torch": torch.__version__, "rows": rows}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| ΔW applied at | neighbour continuation unchanged | first word unchanged |", "|---|---:|---:|"]
    lines += [f"| {label} | {100 * r['unchanged']:.1f} | {100 * r['first_word_unchanged']:.1f} |" for label, r in rows.items()]
    (out_dir / "result.md").write_text(f"{len(prompts)} neighbourhood prompts of the first {n} ROME-layout records, "
                                       "SmolLM2, rlsedit defaults (batches of 20)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
