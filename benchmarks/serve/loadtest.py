"""Bounded load test of ``rlsedit serve`` on loopback.

For 1, 4 and 16 concurrent clients (each sends a fixed number of greedy completion requests,
one after another), with and without an edit stream beside them (one client posting single
edits back to back while the queries run): throughput, p50/p99 latency, and how many edits
landed. The server is a subprocess (``rlsedit serve --port 0``) on a fresh copy of a state.

    python benchmarks/serve/loadtest.py --model tiny --requests 8 --out benchmarks/serve/tiny
    python benchmarks/serve/loadtest.py --model smollm2 --requests 4 --out benchmarks/serve/smollm2

Writes ``results.json``, ``RESULTS.md`` (with this command) and ``results.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
PROMPTS = ["The Eiffel Tower is located in the city of", "Michael Jordan is a professional",
           "The capital of France is", "Albert Einstein was born in the country of",
           "The Great Wall is located in", "Toko Yasuda plays the", "The mother tongue of Danielle Darrieux is",
           "Autonomous University of Madrid is located in"]


def make_state(kind: str, directory: Path) -> tuple[Path, list[dict]]:
    """A fresh state with no edits, and edit records for the edit stream."""
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "tests" / "reliability"))
    from rlsedit.session.session import Runtime, Session

    if kind == "tiny":
        from session_tiny import build_world, edit_records, tiny_config

        world = build_world(directory / "world")
        runtime = Runtime(corpus=str(world.corpus), cache_dir=str(world.cache))
        Session.create(directory / "state", model=str(world.model), config=tiny_config(), runtime=runtime).close()
        return directory / "state", edit_records(200, start=1000)
    from rlsedit.editors import RLSEditConfig

    records = json.loads((DATA / "counterfact" / "counterfact-train.json").read_text())[:200]
    edits = [{"id": f"cf{r['case_id']}", "prompt": r["prompt"], "subject": r["subject"],
              "target_new": r["target_new"]} for r in records]
    runtime = Runtime(corpus=str(DATA / "corpus" / "enwiki_pages_2MB.jsonl"))
    Session.create(directory / "state", model=kind, config=RLSEditConfig(mom2_n_samples=20_000),
                   runtime=runtime).close()
    return directory / "state", edits


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(base: str, model: str, clients: int, requests: int, max_tokens: int, edits: list[dict] | None) -> dict:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    stop = threading.Event()
    edit_times: list[float] = []

    def client(i: int) -> None:
        for j in range(requests):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            start = time.perf_counter()
            status, body = post(base + "/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                        "temperature": 0})
            took = time.perf_counter() - start
            assert status == 200, body
            with lock:
                latencies.append(took)
                tokens[0] += body["usage"]["completion_tokens"]

    def editor() -> None:
        while not stop.is_set() and edits:
            record = edits.pop(0)
            start = time.perf_counter()
            status, body = post(base + "/edits", record)
            assert status == 200, body
            edit_times.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    edit_thread = threading.Thread(target=editor) if edits is not None else None
    start = time.perf_counter()
    if edit_thread:
        edit_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop.set()
    if edit_thread:
        edit_thread.join()
    return {"clients": clients, "edit_stream": edits is not None, "requests": len(latencies), "wall_s": wall,
            "throughput_rps": len(latencies) / wall, "tokens_per_s": tokens[0] / wall,
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
            "edits_applied": len(edit_times),
            "edit_p50_ms": 1000 * percentile(edit_times, 0.5) if edit_times else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (a random 4-layer Llama) or smollm2")
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the server")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rlsedit-loadtest-") as tmp:
        state, edits = make_state(args.model, Path(tmp))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        server = subprocess.Popen([sys.executable, "-m", "rlsedit", "serve", "--state", str(state), "--port", "0",
                                   "--max-batch-rows", "32"], stdout=subprocess.PIPE, text=True, env=env)
        try:
            base = server.stdout.readline().strip().rsplit(" ", 1)[-1]
            model = json.loads(urllib.request.urlopen(base + "/models", timeout=60).read())["data"][0]["id"]
            run_level(base, model, 1, 1, args.max_tokens, None)  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                for stream in (False, True):
                    row = run_level(base, model, clients, args.requests, args.max_tokens,
                                    edits if stream else None)
                    print(json.dumps(row), flush=True)
                    results.append(row)
        finally:
            server.terminate()
            server.wait(timeout=120)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    meta = {"command": command, "model": args.model, "requests_per_client": args.requests,
            "max_tokens": args.max_tokens, "server_threads": args.threads, "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(),
            "seconds_total": round(time.time() - started, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_markdown(out, meta, results)
    plot(out, results, args.model)
    return 0


def write_markdown(out: Path, meta: dict, results: list[dict]) -> None:
    lines = [f"# Serve load test: {meta['model']}", "",
             f"`{meta['command']}`", "",
             f"{meta['requests_per_client']} greedy completion requests per client, max_tokens {meta['max_tokens']}, "
             f"server on {meta['server_threads']} thread(s), {meta['cpus']} CPUs shared with other work "
             f"(load average at the end {meta['load_average_at_end'][0]:.1f}); {meta['seconds_total']} s in all.", "",
             "| clients | edit stream | requests | throughput (req/s) | tokens/s | p50 latency (ms) | p99 latency (ms) "
             "| edits landed | edit p50 (ms) |",
             "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        edit_p50 = f"{r['edit_p50_ms']:.0f}" if r["edit_p50_ms"] is not None else "–"
        lines.append(f"| {r['clients']} | {'yes' if r['edit_stream'] else 'no'} | {r['requests']} "
                     f"| {r['throughput_rps']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
                     f"| {r['edits_applied']} | {edit_p50} |")
    lines += ["", "![throughput and latency](results.png)", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))


def plot(out: Path, results: list[dict], model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for stream, style in ((False, "-o"), (True, "--s")):
        rows = [r for r in results if r["edit_stream"] == stream]
        label = "with edit stream" if stream else "queries only"
        ax1.plot([r["clients"] for r in rows], [r["throughput_rps"] for r in rows], style, label=label)
        ax2.plot([r["clients"] for r in rows], [r["p50_ms"] for r in rows], style, label=f"p50, {label}")
        ax2.plot([r["clients"] for r in rows], [r["p99_ms"] for r in rows], style, alpha=0.5, label=f"p99, {label}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=8)
    ax1.set_ylabel("requests / s")
    ax2.set_ylabel("latency (ms)")
    fig.suptitle(f"rlsedit serve on loopback: {model}")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
