"""How far float rounding moves a value target fitted through Gemma 3's post-MLP norm
(locate/postnorm.py). See docs/TUNING.md ("How exactly the fit is determined").

The first edited layer of the first batch of the 10,000-edit run: its keys, its current output
``K^T W`` and its share of the logged target residual ``R = delta / L`` (L edited layers) (no lower layer has been
written yet, so ``R`` is exact). The fit runs twice, once from the current output as computed and
once from that output times ``1 + 1e-7 * noise`` (about one float32 rounding step), and the two
value targets and their outputs are compared.

    python benchmarks/gemma_postnorm_rounding.py [TARGET_LOG_DIR] [N]
        TARGET_LOG_DIR  default benchmarks/methods/gemma3-270m-train-n10000-b100/rlsedit/targets
        N               the batch size of that run (default 100)
    RLSEDIT_DATA: the data folder (default ../shared/data)
"""
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from rlsedit.bench.edit_stream import select_edits
from rlsedit.bench.target_log import TargetLog
from rlsedit.editors.config import EditConfig
from rlsedit.editors.registry import get_editor_class
from rlsedit.locate.keys import compute_keys
from rlsedit.locate.postnorm import value_through_norm
from rlsedit.locate.prefixes import context_prefixes
from rlsedit.model.arch import resolve
from rlsedit.model.load import load_model
from rlsedit.model.weights import block, get_W

ROOT = Path(__file__).resolve().parents[1]
log_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else \
    ROOT / "benchmarks/methods/gemma3-270m-train-n10000-b100/rlsedit/targets"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
lm = load_model("gemma3-270m")
layers = get_editor_class("rlsedit").layers_for(lm, EditConfig())  # the band the run edited (defaults)
layer = layers[0]
data = Path(os.environ.get("RLSEDIT_DATA", ROOT.parent / "shared/data"))  # as run_10k.sh
requests = select_edits(str(data / "counterfact/counterfact-train.json"), n)
prefixes = context_prefixes(lm)
K = compute_keys(lm, layer, requests, prefixes).float()  # (d_k, u)
delta = TargetLog(log_dir).lookup(tuple(r.id for r in requests))
if delta is None:
    sys.exit(f"{log_dir} holds no target residuals for the first {n} train records")
R = delta.float() / len(layers)  # the first layer's share of z − h (MEMIT spreading)
norm = resolve(block(lm, layer), lm.arch.post_mlp_norm)
current = K.T @ get_W(lm, layer)
with torch.no_grad():
    wanted = norm(current) + R
noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
fits = {}
for name, start in (("as computed", current), ("times 1 + 1e-7·noise", current * (1 + 1e-7 * noise))):
    v = value_through_norm(norm, start, wanted)
    with torch.no_grad():
        miss = float((norm(v) - wanted).norm() / R.norm())
    fits[name] = v
    print(f"{name:>22}: ‖v* − current‖ = {float((v - current).norm()):.3f}, miss ‖norm(v*) − y*‖/‖R‖ = {miss:.4f}")
a, b = fits.values()
with torch.no_grad():
    out_diff = float((norm(a) - norm(b)).norm() / R.norm())
print(f"‖current‖ = {float(current.norm()):.1f}, ‖R‖ = {float(R.norm()):.2f}")
print(f"the two fits differ by {float((a - b).norm()):.4f} = {float((a - b).norm() / (a - current).norm()):.2%} "
      f"of the value change; their outputs by {out_diff:.2%} of ‖R‖")
