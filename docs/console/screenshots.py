"""Screenshots of the console's screens (the PNGs next to this file), taken in headless Debian
chromium against a real server on 127.0.0.1.

    python3 docs/console/screenshots.py                 # SmolLM2, a few CounterFact edits
    python3 docs/console/screenshots.py --model tiny    # the tests' tiny random model (fast)

SmolLM2 needs ``../shared/data`` (CounterFact edits, the corpus for E[kkᵀ]); the page steps
are the browser tests' (``tests/serve/test_console_browser.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
sys.path[:0] = [str(ROOT / "tests" / "serve"), str(ROOT / "tests" / "reliability"), str(ROOT / "tests")]

from serve_tiny import (EDIT_TOKEN, QUERY_TOKEN, build_served_world, make_served_state,  # noqa: E402
                        server_thread, write_tokens)
from test_console_browser import (EDIT_WAIT_S, ask, by_id, chromium_driver, edit_row, fill_edit,  # noqa: E402
                                  shown_text, tab, use_token, wait)

WIDTH = 1280


def smollm2_state(root: Path, n_edits: int):
    """A SmolLM2 state holding the first ``n_edits`` CounterFact edits (ROME layout); its runtime."""
    from rlsedit.editors import RLSEditConfig
    from rlsedit.requests import parse_request
    from rlsedit.session.session import Runtime, Session

    corpus = DATA / "corpus" / "enwiki_pages_2MB.jsonl"
    runtime = Runtime(corpus=str(corpus) if corpus.is_file() else None, cache_dir=str(root / "cache"))
    records = json.loads((DATA / "counterfact" / "counterfact-rome-format.json").read_text())[:n_edits]
    requests = [parse_request(r, i) for i, r in enumerate(records)]
    with Session.create(root / "state", model="smollm2", config=RLSEditConfig(mom2_n_samples=20_000),
                        runtime=runtime) as session:
        session.edit(requests, batch_size=4)
    return runtime, "{} is located in the city of", "The Eiffel Tower", "Rome"


def tiny_state(root: Path, n_edits: int):
    from session_tiny import tiny_runtime

    world = build_served_world(root / "world")
    make_served_state(world, root / "state", n_edits=n_edits)
    return tiny_runtime(world), "{} plays the", "Rome 9", "piano"


def snap(driver, out: Path, name: str) -> None:
    """A screenshot of the whole page (the window grown to the page's height)."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 500);")
    driver.set_window_size(WIDTH, height + 140)  # the window's frame is not part of the page
    time.sleep(0.3)  # one layout pass after the resize
    driver.save_screenshot(str(out / f"{name}.png"))
    print(f"wrote {out / name}.png", flush=True)
    driver.set_window_size(WIDTH, 900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--edits", type=int, default=12, help="edits in the state before the console opens")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rlsedit-console-shots-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        runtime, template, subject, target = (smollm2_state if args.model == "smollm2" else tiny_state)(root, args.edits)
        print(f"state with {args.edits} edits in {time.perf_counter() - start:.0f} s", flush=True)
        prompt = template.replace("{}", subject)
        with server_thread(None, root / "state", tokens=write_tokens(root / "tokens.json"), runtime=runtime) as (base, _):
            site = base.replace("/v1", "")
            with chromium_driver(WIDTH, 900) as driver:
                shoot(driver, site, args.out, prompt, template, subject, target)
        print(f"done in {time.perf_counter() - start:.0f} s")


def shoot(driver, site: str, out: Path, prompt: str, template: str, subject: str, target: str) -> None:
    use_token(driver, site, EDIT_TOKEN, "curator")
    ask(driver, prompt, 8)

    fill_edit(driver, template, subject, target, "console-demo")
    by_id(driver, "edit-go").click()
    wait(driver, lambda d: by_id(d, "edit-progress").is_displayed()
         and "computing" in by_id(d, "edit-progress-text").text, EDIT_WAIT_S)
    driver.save_screenshot(str(out / "edit-progress.png"))
    print(f"wrote {out / 'edit-progress'}.png", flush=True)
    shown_text(driver, "edit-result", EDIT_WAIT_S * 5)
    snap(driver, out, "edit")

    fill_edit(driver, template.replace("{}", ""), subject, target, "no-slot")
    by_id(driver, "edit-go").click()
    shown_text(driver, "edit-error")
    snap(driver, out, "edit-error")

    ask(driver, prompt, 8)
    snap(driver, out, "ask")

    tab(driver, "edits")
    wait(driver, lambda d: edit_row(d, "console-demo"))
    first = driver.find_elements("css selector", "#edits-table tbody tr")[0].get_attribute("data-id")
    undo = edit_row(driver, first).find_element("css selector", "button.undo")
    undo.click()
    undo.click()
    wait(driver, lambda d: edit_row(d, first) is None, EDIT_WAIT_S * 5)
    driver.find_element("css selector", "#edits-status option[value=all]").click()
    wait(driver, lambda d: "undone" in edit_row(d, first).text)
    by_id(driver, "edits-check-page").click()
    wait(driver, lambda d: not [c for c in d.find_elements("css selector", "#edits-table td.check")
                                if "checking" in c.text or c.text == "—"], EDIT_WAIT_S * 5)
    snap(driver, out, "edits")

    tab(driver, "health")
    wait(driver, lambda d: d.find_elements("css selector", "#chart-forgetting svg circle.forget-point"),
         EDIT_WAIT_S * 5)
    snap(driver, out, "health")

    use_token(driver, site, QUERY_TOKEN, "reader")
    tab(driver, "edit")
    snap(driver, out, "query-scope")


if __name__ == "__main__":
    main()
