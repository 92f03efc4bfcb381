"""The server on the real SmolLM2: greedy = ``rlsedit ask``, an edit over HTTP changes the
answer, its undo over HTTP restores it."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_tiny import client, http, one_thread, server_thread

__all__ = ["one_thread"]

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "corpus" / "enwiki_pages_2MB.jsonl"
PROMPT = "The Eiffel Tower is located in the city of"


@pytest.mark.integration
def test_edit_and_undo_over_http_on_smollm2(tmp_path):
    from rlsedit.editors import RLSEditConfig
    from rlsedit.session.cli import _ask
    from rlsedit.session.session import Runtime, Session

    runtime = Runtime(corpus=str(CORPUS) if CORPUS.is_file() else None)
    with Session.create(tmp_path / "state", model="smollm2", config=RLSEditConfig(mom2_n_samples=20_000),
                        runtime=runtime) as session:
        before = _ask(session.lm, PROMPT, 6)["completion"]  # what `rlsedit ask` answers
    with server_thread(None, tmp_path / "state", runtime=runtime) as (base, service):
        c = client(base)
        first = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0)
        assert first.choices[0].text == before and "Paris" in before
        status, done = http("POST", base + "/edits", {"id": "eiffel", "prompt": "{} is located in the city of",
                                                      "subject": "The Eiffel Tower", "target_new": "Rome"})
        assert status == 200, done
        edited = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0)
        assert edited.system_fingerprint == done["system_fingerprint"] and "Rome" in edited.choices[0].text
        assert http("DELETE", base + "/edits/eiffel")[0] == 200
        again = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0)
        assert again.choices[0].text == before
