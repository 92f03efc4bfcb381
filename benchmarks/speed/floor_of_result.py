"""Add the FLOP floor to a ``rlsedit bench speed`` result made before the benchmark computed it.

    python benchmarks/speed/floor_of_result.py benchmarks/speed/smollm2-n1000-b20-float32/result.json

Recounts the stream's matrix-product FLOPs from its edits (same model, layers, prefixes and
batches; each batch's requests at that batch's mean Adam steps, since those results kept only
the mean), measures this machine's float32 (and bfloat16) product rate, and writes the
``floor`` block into the result and a ``floor.md`` line beside it. The machine should be idle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlsedit.bench.floor import batch_flops, floor_summary, matmul_rate
from rlsedit.bench.methods import select_edits
from rlsedit.editors import get_editor_class
from rlsedit.editors.base import iter_batches
from rlsedit.locate.prefixes import context_prefixes
from rlsedit.model.load import load_model


def main(path: str) -> None:
    result_path = Path(path)
    result = json.loads(result_path.read_text())
    s = result["settings"]
    torch.set_num_threads(s["threads"])
    lm = load_model(s["model"])
    cls = get_editor_class(s["method"])
    config = cls.config_class.from_json_file(s["hparams"]) if s.get("hparams") else cls.config_class()
    prefixes = context_prefixes(lm, count=config.context_count, length=config.context_length, seed=config.seed)
    requests = select_edits(s["data"], result["n"])
    total = {"targets": 0.0, "keys": 0.0, "solve": 0.0}
    for batch, row in zip(iter_batches(requests, s["batch_size"]), result["batches"]):
        steps = row.get("target_steps") or [round(row["target_steps_mean"])] * len(batch)
        for k, v in batch_flops(lm, s["layers"], batch, prefixes, steps).items():
            total[k] += v
    rates = {"float32": matmul_rate(torch.float32)}
    if config.v_dtype == "bfloat16":
        rates["targets"] = matmul_rate(torch.bfloat16)
    floor = floor_summary(total, result["n"], rates)
    floor["note"] = "computed after the run by benchmarks/speed/floor_of_result.py (mean steps per batch)"
    result["floor"] = floor
    result["seconds_per_edit_over_floor"] = result["seconds_per_edit"] / floor["floor_seconds_per_edit_total"]
    result_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(floor, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
