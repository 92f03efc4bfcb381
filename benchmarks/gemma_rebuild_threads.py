"""Rebuild the first batches of a 10,000-edit Gemma 3 run from its target log in a scratch
session, and compare the edited layers with the run's progress lines and, across calls, with
each other (another thread count, another state dtype). See docs/TUNING.md ("How exactly the
fit is determined").

    python benchmarks/gemma_rebuild_threads.py [--method rlsedit] [--sweep lambda=1] [--batches 1] [--threads 2]
        [--state-dtype float32|float64] [--save W.pt] [--compare OTHER.pt]

--save writes the rebuilt layers' weights (torch.save of plain tensors, this script's own file);
--compare prints ‖W − W_other‖ per layer against such a file written by an earlier call.
The bench settings (model, edit stream, batches, corpus) are read from the folder's settings.json.
"""
import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from rlsedit.bench.edit_stream import select_edits
from rlsedit.bench.methods import TARGETS_DIR, diagnostics_summary, rebuild_batch
from rlsedit.bench.methods_cli import _OPTIONS, build_config
from rlsedit.bench.methods_config import plan_runs
from rlsedit.bench.resume import SETTINGS_FILE, read_progress
from rlsedit.bench.target_log import TargetLog
from rlsedit.model.weights import get_W
from rlsedit.session.session import Runtime, Session

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks/methods/gemma3-270m-train-n10000-b100"

parser = argparse.ArgumentParser()
parser.add_argument("--method", default="rlsedit", help="a method of the 10K Gemma bench that logs value targets")
parser.add_argument("--sweep", help="the bench's --sweep point of the run, e.g. lambda=1 (default: the method's own run)")
parser.add_argument("--batches", type=int, default=1)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--state-dtype", choices=("float32", "float64"))
parser.add_argument("--save")
parser.add_argument("--compare")
args = parser.parse_args()
torch.set_num_threads(args.threads)
values = {dest: None for _, dest, _ in _OPTIONS}
settings = json.loads((FOLDER / SETTINGS_FILE).read_text())
# every pinned setting the options take as given ("checkpoints" is the count behind checkpoint_edits,
# "general" the suites' expanded names: neither enters a rebuild)
values.update({k: v for k, v in settings.items() if k in values and k not in ("checkpoints", "general")})
values.update(methods=[args.method], sweep=args.sweep, sweep_only=True if args.sweep else None)
config = build_config(values)
[run] = plan_runs(config)  # the same run (folder, config) the bench made for these options
if args.state_dtype:
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, state_dtype=args.state_dtype))
requests = select_edits(config.data, config.n, shuffle=config.shuffle, seed=config.seed)
if [r.id for r in requests] != settings["edit_ids"]:
    sys.exit(f"{config.data} does not give the edit stream pinned in {FOLDER / SETTINGS_FILE}")
batches = [requests[i:i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
folder = FOLDER / run.dir_name
lines = {r["batch"]: r for r in read_progress(folder / "progress.jsonl")}
runtime = Runtime(device="cpu", cache_dir=config.cache_dir, corpus=config.corpus)
with tempfile.TemporaryDirectory() as scratch:
    session = Session.create(Path(scratch) / "state", model=config.model, method=run.method, config=run.config,
                             runtime=runtime)
    session.editor.target_log = TargetLog(folder / TARGETS_DIR)
    for b in range(1, args.batches + 1):
        match = rebuild_batch(session, batches[b - 1], b, lines[b])
        print(f"batch {b}: {match}")
        now = diagnostics_summary(session.editor.diagnostics())["layers"]
        for layer, was in lines[b]["diagnostics"]["layers"].items():
            print(f"  layer {layer}: ‖W−W0‖ {now[layer]['drift_fro']:.6f} (run {was['drift_fro']:.6f}), "
                  f"anchor residual {now[layer]['anchor_residual']:.6f} (run {was['anchor_residual']:.6f})")
    weights = {layer: get_W(session.lm, layer).clone() for layer in session.editor.layers}
    session.close(snapshot=False)
if args.save:
    torch.save(weights, args.save)
if args.compare:
    other = torch.load(args.compare, weights_only=True)
    for layer, W in weights.items():
        print(f"layer {layer}: ‖W − W_other‖ = {float((W.double() - other[layer].double()).norm()):.4f}")
