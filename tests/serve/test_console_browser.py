"""The console in real headless Chromium (Debian's ``chromium`` and ``chromedriver``, driven by
Selenium with the driver's path given, so Selenium Manager never runs and nothing is
downloaded) against a real server on 127.0.0.1 with a tiny random model: ask, edit through
the form, see the answer change, undo from the table, see it change back; an invalid edit
shows the server's own message and changes nothing; a query-scope token cannot edit.

``chromium_driver`` is also what ``docs/console/screenshots.py`` drives.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

from serve_tiny import (EDIT_TOKEN, QUERY_TOKEN, build_served_world, http, make_served_state, one_thread,
                        server_thread, write_tokens)

__all__ = ["one_thread"]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
WAIT_S = 10  # one page step: a click and the server's answer on the tiny model
EDIT_WAIT_S = 120  # one edit or undo computed on the tiny model by a 2-core machine under load
PROMPT = "Rome 9 plays the"


@contextlib.contextmanager
def chromium_driver(width: int = 1280, height: int = 900) -> Iterator[object]:
    """Headless Chromium with a fresh profile; skips the test when Debian's chromium is absent."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is absent (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_manager(*args, **kwargs):
        raise AssertionError("Selenium Manager must not run: the driver path is given")

    profile = tempfile.mkdtemp(prefix="rlsedit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    original = selenium_manager.SeleniumManager.binary_paths
    selenium_manager.SeleniumManager.binary_paths = no_manager
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    finally:
        selenium_manager.SeleniumManager.binary_paths = original
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@contextlib.contextmanager
def edit_held_in_propose(service, timeout: float = EDIT_WAIT_S) -> Iterator[threading.Event]:
    """Inside: an edit batch, once computed, waits in ``propose`` (so it stays the running batch)
    until the block ends; yields the event set when one is held."""
    editor = service.session.editor
    real, inside, release = editor.propose, threading.Event(), threading.Event()

    def held(requests):
        try:
            return real(requests)
        finally:
            inside.set()
            release.wait(timeout)

    editor.propose = held
    try:
        yield inside
    finally:
        release.set()
        del editor.propose  # the instance attribute: the class's method again


# ---- page steps (used by the tests and by docs/console/screenshots.py) ---------------------------

def wait(driver, condition, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def use_token(driver, root: str, token: str, expect_name: str) -> None:
    driver.get(root + "/")
    box = by_id(driver, "token")
    box.clear()
    box.send_keys(token)
    by_id(driver, "token-use").click()
    wait(driver, lambda d: expect_name in by_id(d, "who").text)


def tab(driver, name: str) -> None:
    driver.find_element("css selector", f'#tabs button[data-tab="{name}"]').click()


def ask(driver, prompt: str, max_tokens: int = 6) -> tuple[str, str, int]:
    """Ask on the Ask tab; returns (edited answer, unedited answer, weight version)."""
    tab(driver, "ask")
    driver.execute_script("document.getElementById('ask-edited').dataset.version = '';")
    for element_id, value in (("ask-prompt", prompt), ("ask-max", str(max_tokens))):
        box = by_id(driver, element_id)
        box.clear()
        box.send_keys(value)
    by_id(driver, "ask-go").click()
    wait(driver, lambda d: by_id(d, "ask-edited").get_attribute("data-version"))
    return (by_id(driver, "ask-edited").text, by_id(driver, "ask-unedited").text,
            int(by_id(driver, "ask-edited").get_attribute("data-version")))


def fill_edit(driver, prompt: str, subject: str, target: str, edit_id: str) -> None:
    tab(driver, "edit")
    for element_id, value in (("edit-prompt", prompt), ("edit-subject", subject), ("edit-target", target),
                              ("edit-id", edit_id)):
        box = by_id(driver, element_id)
        box.clear()
        box.send_keys(value)


def shown_text(driver, element_id: str, timeout: float = WAIT_S) -> str:
    wait(driver, lambda d: by_id(d, element_id).is_displayed() and by_id(d, element_id).text, timeout)
    return by_id(driver, element_id).text


def edit_row(driver, edit_id: str):
    rows = driver.find_elements("css selector", f'#edits-table tr[data-id="{edit_id}"]')
    return rows[0] if rows else None


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("console-browser")
    world = build_served_world(root)
    make_served_state(world, root / "state", n_edits=3)
    return world


@pytest.fixture(scope="module")
def server(world):
    state = world.root / "served"
    shutil.copytree(world.root / "state", state)
    with server_thread(world, state, tokens=write_tokens(world.root / "tokens.json")) as (base, service):
        yield base.replace("/v1", ""), service


@pytest.fixture(scope="module")
def driver():
    with chromium_driver() as d:
        yield d


def _version(root: str) -> int:
    return http("GET", root + "/health")[1]["weight_version"]


def _direct(root: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    return http("POST", root + "/v1/completions", body, token=QUERY_TOKEN)[1]["choices"][0]["text"]


# ---- tests -------------------------------------------------------------------------------------

def test_ask_edit_undo_round_trip(server, driver):
    root = server[0]
    use_token(driver, root, EDIT_TOKEN, "curator")
    before, unedited, v0 = ask(driver, PROMPT)
    assert v0 == _version(root) and before == _direct(root, PROMPT)

    fill_edit(driver, "{} plays the", "Rome 9", "piano", "b1")
    by_id(driver, "edit-go").click()
    result = shown_text(driver, "edit-result", EDIT_WAIT_S)
    v1 = _version(root)
    assert "b1" in result and f"weight version {v1}" in result and v1 == v0 + 1
    edited, unedited_after, seen = ask(driver, PROMPT)
    assert seen == v1 and edited == _direct(root, PROMPT)
    assert edited != before  # the edit changed the edited model's answer …
    assert unedited_after == unedited  # … and not the unedited model's

    tab(driver, "edits")
    row = wait(driver, lambda d: edit_row(d, "b1"))
    row.find_element("css selector", "button.check-one").click()
    wait(driver, lambda d: edit_row(d, "b1").find_element("css selector", "td.check .gen").text)
    check = http("POST", root + "/v1/console/check", {"ids": ["b1"]}, token=QUERY_TOKEN)[1]["data"][0]
    cell = edit_row(driver, "b1").find_element("css selector", "td.check").text
    assert cell.startswith("yes" if check["says"] else "no") and check["generation"] in cell
    undo = edit_row(driver, "b1").find_element("css selector", "button.undo")
    undo.click()
    assert undo.text == "Confirm undo"  # the first click only arms it
    undo.click()
    wait(driver, lambda d: edit_row(d, "b1") is None, EDIT_WAIT_S)  # gone from the live list
    assert http("GET", root + "/v1/edits/b1", token=QUERY_TOKEN)[1]["status"] == "undone"

    back, unedited_last, v2 = ask(driver, PROMPT)
    assert v2 == v1 + 1 and back == before and unedited_last == unedited


def test_invalid_edit_shows_the_server_message_and_changes_nothing(server, driver):
    root = server[0]
    use_token(driver, root, EDIT_TOKEN, "curator")
    version, total = _version(root), http("GET", root + "/v1/edits?status=all", token=QUERY_TOKEN)[1]["total"]
    fill_edit(driver, "plays the", "Rome 9", "piano", "bad1")  # no {} slot for the subject
    by_id(driver, "edit-go").click()
    shown = shown_text(driver, "edit-error")
    status, answer = http("POST", root + "/v1/edits", {"prompt": "plays the", "subject": "Rome 9",
                                                       "target_new": "piano", "id": "bad1"}, token=EDIT_TOKEN)
    assert status == 400 and shown == answer["error"]["message"] and "'{}'" in shown
    assert not by_id(driver, "edit-result").is_displayed()

    upload = Path(tempfile.mkdtemp(prefix="rlsedit-upload-")) / "edits.jsonl"
    upload.write_text(json.dumps({"prompt": "{} plays the", "subject": "Rome 8", "target_new": "piano"})
                      + "\n{not json\n")
    by_id(driver, "upload-file").send_keys(str(upload))
    by_id(driver, "upload-go").click()
    wait(driver, lambda d: "line 2" in by_id(d, "edit-error").text)
    status, answer = http("POST", root + "/v1/edits", upload.read_text(), token=EDIT_TOKEN,
                          content_type="application/jsonl")
    assert status == 400 and by_id(driver, "edit-error").text == answer["error"]["message"]
    shutil.rmtree(upload.parent)
    assert _version(root) == version  # nothing of either was applied
    assert http("GET", root + "/v1/edits?status=all", token=QUERY_TOKEN)[1]["total"] == total


def test_query_token_cannot_edit(server, driver):
    root = server[0]
    use_token(driver, root, QUERY_TOKEN, "reader")
    version = _version(root)
    tab(driver, "edit")
    assert by_id(driver, "edit-scope").is_displayed()
    assert not by_id(driver, "edit-go").is_enabled() and not by_id(driver, "upload-go").is_enabled()
    tab(driver, "edits")
    wait(driver, lambda d: edit_row(d, "e0"))
    assert not [b for b in driver.find_elements("css selector", "button.undo") if b.is_displayed()]
    # the page's restrictions are a courtesy: with the form re-enabled by hand, the server refuses
    driver.execute_script("document.getElementById('edit-fields').disabled = false;")
    fill_edit(driver, "{} plays the", "Rome 7", "piano", "sneaky")
    by_id(driver, "edit-go").click()
    assert "lacks the 'edit' scope" in shown_text(driver, "edit-error")
    driver.set_script_timeout(WAIT_S)
    status = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/v1/edits/e0', {method: 'DELETE', headers: {Authorization: 'Bearer ' + arguments[0]}})"
        ".then(r => done(r.status));", QUERY_TOKEN)
    assert status == 403 and _version(root) == version
    assert http("GET", root + "/v1/edits/e0", token=QUERY_TOKEN)[1]["status"] == "live"


def test_health_draws_the_charts(server, driver):
    root, service = server
    use_token(driver, root, QUERY_TOKEN, "reader")
    tab(driver, "health")
    layers = len(service.session.editor.layers)
    wait(driver, lambda d: len(d.find_elements("css selector", "#chart-drift svg rect.bar")) == layers)
    wait(driver, lambda d: d.find_elements("css selector", "#chart-forgetting svg circle.forget-point"), EDIT_WAIT_S)
    live = http("GET", root + "/v1/edits", token=QUERY_TOKEN)[1]["total"]
    assert len(driver.find_elements("css selector", "#chart-forgetting svg circle.forget-point")) == live
    drift_points = http("GET", root + "/v1/console/drift", token=QUERY_TOKEN)[1]["points"]
    dots = driver.find_elements("css selector", "#chart-history svg circle.drift-point")
    assert len(dots) == len(drift_points) * layers


def test_progress_of_a_running_batch_is_shown(server, driver):
    root, service = server
    use_token(driver, root, EDIT_TOKEN, "curator")
    fill_edit(driver, "{} plays the", "Rome 6", "piano", "held1")
    with edit_held_in_propose(service) as inside:
        by_id(driver, "edit-go").click()
        assert inside.wait(timeout=EDIT_WAIT_S)
        wait(driver, lambda d: "computing 1 edit(s)" in by_id(d, "edit-progress-text").text)
        assert not by_id(driver, "edit-go").is_enabled()  # no second submit while one runs
    assert "held1" in shown_text(driver, "edit-result", EDIT_WAIT_S)
    assert not by_id(driver, "edit-progress").is_displayed()
    assert http("DELETE", root + "/v1/edits/held1", token=EDIT_TOKEN)[0] == 200
