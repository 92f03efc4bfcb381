"""Gemma-3-270M: value-target optimisation of the first 20 val records at its top edited layer (6)
for three Adam learning rates; prints steps, p(target), loss, ‖h‖ and ‖δ‖/‖h‖. See docs/TUNING.md."""
import time
from pathlib import Path

import torch
torch.set_num_threads(2)
from rlsedit.model.load import load_model
from rlsedit.locate.targets import compute_targets, TargetConfig
from rlsedit.locate.prefixes import context_prefixes
from rlsedit.bench.methods import select_edits
from rlsedit.editors.rlsedit import RLSEditConfig
lm = load_model('gemma3-270m'); c = RLSEditConfig()
prefixes = list(context_prefixes(lm, count=c.context_count, length=c.context_length, seed=c.seed))
reqs = select_edits(Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'counterfact' / 'counterfact-val.json', 20)
for lr in (0.5, 2.0, 5.0):
    cfg = TargetConfig(steps=c.v_num_grad_steps, lr=lr, weight_decay=c.v_weight_decay, kl_factor=c.kl_factor,
        clamp_norm_factor=c.clamp_norm_factor, early_stop_loss=c.v_early_stop_loss, early_stop_nll=c.v_early_stop_nll)
    t = time.perf_counter(); r = compute_targets(lm, 6, reqs, prefixes, cfg)
    hn = r.initial.norm(dim=1)
    print(f'lr {lr}: {time.perf_counter()-t:.1f} s, steps mean {r.steps.float().mean():.1f}, p(target) mean {r.target_prob.mean():.3f}, '
          f'loss mean {r.losses.mean():.3f}, |h| mean {hn.mean():.0f}, |delta|/|h| mean {(r.delta.norm(dim=1)/hn).mean():.3f}', flush=True)
