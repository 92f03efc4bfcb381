"""How often the unedited SmolLM2 begins a true paraphrase with the new object when the new fact
is stated just before it (in-context, no weight change): a reference for issue #29's "said on true
paraphrases" figure. The 194 ROME-layout records; the same decoding as eval/generation.py (greedy,
12 tokens, stop at "." or a newline, SQuAD-normalised begins/mentions).

    python benchmarks/quality/smollm2-rome-n194-in-context/run.py [DATA_DIR]

writes records.json and prints the summary (summary.txt) beside this file.
"""
import json
import sys
from pathlib import Path

import torch

from rlsedit import load_model
from rlsedit.eval.decoding import greedy_generate
from rlsedit.eval.generation import begins_with, mentions

HERE = Path(__file__).resolve().parent
DATA = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / ".." / "shared" / "data")
torch.set_num_threads(2)

records = json.load(open(DATA / "counterfact" / "counterfact-rome-format.json"))
lm = load_model("smollm2")


def statement(rw):
    """The edit as the edit prompt followed by its new object: "What is ... of X? It is Y." """
    return f"{rw['prompt'].format(rw['subject'])} {rw['target_new']['str']}."


rows = []  # (record index, kind, prompt)
for i, r in enumerate(records):
    rw = r["requested_rewrite"]
    rows.append((i, "edit", rw["prompt"].format(rw["subject"])))
    rows += [(i, "paraphrase", p) for p in r["paraphrase_prompts"]]
    rows += [(i, "neighbour", p) for p in r["neighborhood_prompts"][:3]]

contexts = {
    "none": lambda rw: "",
    "stated": lambda rw: statement(rw) + " ",
    "stated-newline": lambda rw: statement(rw) + "\n",
}
texts = {}
for name, ctx in contexts.items():
    prompts = [ctx(records[i]["requested_rewrite"]) + p for i, _, p in rows]
    texts[name] = greedy_generate(lm, prompts, 12, stop=(".", "\n"))

out = []
for k, (i, kind, p) in enumerate(rows):
    rw = records[i]["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    row = dict(i=i, kind=kind, prompt=p, new=new, true=true)
    for name in contexts:
        t = texts[name][k]
        row[name] = dict(text=t, begins_new=begins_with(t, new), mentions_new=mentions(t, new),
                         begins_true=begins_with(t, true))
    out.append(row)
json.dump(out, open(HERE / "records.json", "w"), indent=1)

lines = []
for kind in ("edit", "paraphrase", "neighbour"):
    sel = [o for o in out if o["kind"] == kind]
    answered = [o for o in sel if o["none"]["begins_true"]]
    for name in contexts:
        b = sum(o[name]["begins_new"] for o in sel)
        m = sum(o[name]["mentions_new"] for o in sel)
        bt = sum(o[name]["begins_true"] for o in sel)
        ba = sum(o[name]["begins_new"] for o in answered)
        lines.append(f"{kind:10s} {name:15s} n={len(sel):4d} begins new {b:4d} ({100*b/len(sel):5.1f} %)  "
                     f"mentions new {m:4d} ({100*m/len(sel):5.1f} %)  begins true/old {bt:4d}  "
                     f"where answered unedited: {ba}/{len(answered)}")
print("\n".join(lines))
(HERE / "summary.txt").write_text("\n".join(lines) + "\n")
