"""How much of the target change an edit realises at the top edited layer, and how much of each
layer's residual share its post-FFN norm lets through. See docs/TUNING.md.

    python benchmarks/tuning_gemma_reach.py gemma3-270m 20 [method]   (method: rlsedit (default), rome, ...)
"""
import sys, tempfile
from pathlib import Path

import torch
torch.set_num_threads(1)
import rlsedit.editors.base as EB
from rlsedit.session.session import Session, Runtime
from rlsedit.bench.methods import select_edits
from rlsedit.model.arch import resolve
from rlsedit.model.weights import block
from rlsedit.locate.targets import hidden_at_subject

orig = EB.Editor._absolute_targets
rows = []
def spy(self, layer, K, W, R):
    V = orig(self, layer, K, W, R)
    norm = resolve(block(self.lm, layer), self.lm.arch.post_mlp_norm) if self.lm.arch.post_mlp_norm else (lambda x: x)
    with torch.no_grad():
        y = norm(K.T @ W); y2 = norm(V)
        got = ((y2 - y) * R).sum(-1) / R.pow(2).sum(-1)
        rows.append((layer, R.norm(dim=-1).mean().item(), y.norm(dim=-1).mean().item(), got.mean().item(),
                     ((y2 - y) - R).norm(dim=-1).mean().item() / R.norm(dim=-1).mean().item()))
    return V
EB.Editor._absolute_targets = spy
model = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
method = sys.argv[3] if len(sys.argv) > 3 else 'rlsedit'
reqs = select_edits(str(Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'counterfact' / 'counterfact-val.json'), n)
s = Session.create(tempfile.mkdtemp() + '/st', model=model, method=method, runtime=Runtime())
ed = s.editor; top = ed.layers[-1]
# z from the targets: capture via compute_targets result
import rlsedit.locate.targets as T
cap = []  # one result per call: ROME computes each request's target on its own
_ct = T.compute_targets
def ct(*a, **k):
    r = _ct(*a, **k); cap.append(r); return r
T.compute_targets = ct
h0 = hidden_at_subject(s.lm, top, reqs).float()
s.edit(reqs, batch_size=n)
h1 = hidden_at_subject(s.lm, top, reqs).float()
delta = torch.cat([c.z - c.initial for c in cap]).float()
target_prob = torch.cat([c.target_prob for c in cap])
print(f"{model} {method} layers {list(ed.layers)}: ‖h‖ {h0.norm(dim=-1).mean():.0f}, ‖δ‖ {delta.norm(dim=-1).mean():.1f}, p(target) at opt {target_prob.mean():.3f}")
print(f"realised at top: (h1-h0)·δ/‖δ‖² = {(((h1-h0)*delta).sum(-1)/delta.pow(2).sum(-1)).mean():.3f}; ‖h1-h0-δ‖/‖δ‖ = {((h1-h0-delta).norm(dim=-1)/delta.norm(dim=-1)).mean():.3f}")
for l in sorted({row[0] for row in rows}):  # mean over the calls (ROME: one per request)
    rn, yn, got, miss = (sum(c) / len(c) for c in zip(*[row[1:] for row in rows if row[0] == l]))
    print(f"layer {l}: ‖R‖ {rn:.1f}  ‖y‖ {yn:.1f}  asked-for fraction the mapped value carries {got:.3f}  ‖Δy−R‖/‖R‖ {miss:.3f}")
from rlsedit.bench.speed import efficacy
print("efficacy on these edits after the batch:", efficacy(s.lm, reqs))
s.close(snapshot=False)
