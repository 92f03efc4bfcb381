"""Summarise records.json (written by run.py, the script as it ran: 194 ROME-layout edits at the
defaults, batches of 20, 1 thread; greedy continuations of every true paraphrase and edit prompt
before and after the stream). `python benchmarks/quality/smollm2-rome-n194-paraphrase-misses/summarize.py`"""

import json
from pathlib import Path

from rlsedit.eval.generation import begins_with, mentions

rows = json.loads((Path(__file__).parent / "records.json").read_text())
said = [r for r in rows if r["says"]]
answered = [r for r in rows if r["says_before_true"]]
edits = {r["i"]: r for r in rows}.values()
edits_answered = [r for r in edits if begins_with(r["edit_before"], r["true"])]
misses = [r for r in rows if not r["says"]]
print(f"true paraphrases: {len(rows)}; said (begins with the new object) {len(said)} ({100 * len(said) / len(rows):.1f} %)")
print(f"  mentioned: {sum(mentions(r['after'], r['new']) for r in rows)}; "
      f"misses that mention it: {sum(mentions(r['after'], r['new']) for r in misses)}, "
      f"that say the old object: {sum(begins_with(r['after'], r['true']) for r in misses)}")
print(f"  answered with the old object by the unedited model: {len(answered)} ({100 * len(answered) / len(rows):.1f} %); "
      f"said after the edits: {sum(r['says'] for r in answered)} "
      f"({100 * sum(r['says'] for r in answered) / len(answered):.1f} %)")
n_said = sum(begins_with(r["edit_after"], r["new"]) for r in edits)
print(f"edit prompts: {len(edits)}; said {n_said} ({100 * n_said / len(edits):.1f} %); answered with the old object "
      f"unedited: {len(edits_answered)}; said after: {sum(begins_with(r['edit_after'], r['new']) for r in edits_answered)}")
