"""Pieces of the server on their own: the readers–writer lock, decoding rows against
``greedy_generate``, nucleus sampling's limit, streamed text hold-back, the tokens file."""

from __future__ import annotations

import json
import threading

import pytest

from serve_tiny import build_served_world, one_thread

from session_tiny import tiny_runtime

__all__ = ["one_thread"]


def test_rwlock_writer_waits_for_readers_and_blocks_new_ones():
    from rlsedit.serve.rwlock import ReadWriteLock

    lock, order = ReadWriteLock(), []
    reading, release_reader, writer_waiting = threading.Event(), threading.Event(), threading.Event()

    def reader():
        with lock.read():
            order.append("read 1")
            reading.set()
            assert release_reader.wait(timeout=30)
        order.append("read 1 done")

    def writer():
        writer_waiting.set()
        with lock.write():
            order.append("write")

    def late_reader():
        with lock.read():
            order.append("read 2")

    first = threading.Thread(target=reader)
    first.start()
    assert reading.wait(timeout=30)
    w = threading.Thread(target=writer)
    w.start()
    assert writer_waiting.wait(timeout=30)
    for _ in range(1000):  # until the writer is queued on the lock (bounded)
        if lock._writers_waiting:
            break
        threading.Event().wait(0.01)
    assert lock._writers_waiting == 1
    late = threading.Thread(target=late_reader)
    late.start()
    release_reader.set()
    for t in (first, w, late):
        t.join(timeout=30)
    assert order == ["read 1", "read 1 done", "write", "read 2"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from rlsedit.model.load import load_model

    world = build_served_world(tmp_path_factory.mktemp("units"))
    return load_model(str(world.model), cache_dir=tiny_runtime(world).cache_dir)


def test_a_row_alone_is_greedy_generate_and_tiny_top_p_is_greedy(tiny_lm):
    from rlsedit.eval.decoding import greedy_generate
    from rlsedit.eval.scoring import encode_prompt
    from rlsedit.serve.decode import Row, Sampling, decode_rows

    prompts = ["Paris 0 is located in", "Toko Yasuda plays the", "The"]
    decode = lambda ids: tiny_lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for prompt in prompts:
        want = greedy_generate(tiny_lm, [prompt], 10)[0]
        alone = Row(encode_prompt(tiny_lm.tokenizer, prompt), Sampling(max_tokens=10))
        nucleus = Row(encode_prompt(tiny_lm.tokenizer, prompt), Sampling(max_tokens=10, temperature=1.0,
                                                                          top_p=1e-9, seed=3))
        decode_rows(tiny_lm, [alone], decode)
        decode_rows(tiny_lm, [nucleus], decode)
        assert alone.text == want and nucleus.text == want
    # one padded batch: the same texts as greedy_generate's own padded batch
    rows = [Row(encode_prompt(tiny_lm.tokenizer, p), Sampling(max_tokens=10)) for p in prompts]
    decode_rows(tiny_lm, rows, decode)
    assert [r.text for r in rows] == greedy_generate(tiny_lm, prompts, 10, batch_size=8)
    # rows with their own max_tokens stop at their own length
    rows = [Row(encode_prompt(tiny_lm.tokenizer, p), Sampling(max_tokens=m)) for p, m in zip(prompts, (3, 10, 6))]
    decode_rows(tiny_lm, rows, decode)
    for row, m in zip(rows, (3, 10, 6)):
        assert len(row.tokens) == m if row.finish_reason == "length" else len(row.tokens) < m


def test_streamed_text_holds_back_a_possible_stop_and_broken_characters():
    from rlsedit.serve.app import _streamable

    assert _streamable("hello wor", ("world",)) == "hello "
    assert _streamable("hello", ("xyz",)) == "hello"
    assert _streamable("caf\ufffd", ()) == "caf"


def test_tokens_file_is_checked(tmp_path):
    from rlsedit.errors import InvalidRequestError
    from rlsedit.serve.auth import TokenTable

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"tokens": [{"name": "a", "token": "x" * 20, "scopes": ["edit"]}]}))
    table = TokenTable.from_file(good)
    assert table.lookup("x" * 20).scopes == {"query", "edit"} and table.lookup("x" * 19) is None
    for bad, needle in [({"tokens": []}, "at least one"), ({"tokens": [{"token": "short", "scopes": ["query"]}]}, "16"),
                        ({"tokens": [{"token": "y" * 20, "scopes": ["admin"]}]}, "scopes")]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(InvalidRequestError, match=needle):
            TokenTable.from_file(path)
