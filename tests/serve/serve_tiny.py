"""A tiny served state for the server tests: the random 4-layer Llama of
``tests/reliability/session_tiny.py`` (with a chat template), a state with a few edits, and
a real uvicorn server on 127.0.0.1 (a free port picked by the OS), in a thread or in a
subprocess. Not a test module.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from session_tiny import (TinyWorld, build_world, child_env, edit_records, one_thread, rlsedit_command,  # noqa: E402
                          tiny_config, tiny_runtime)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

__all__ = ["one_thread"]

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")

QUERY_TOKEN = "query-token-0123456789abcdef"
EDIT_TOKEN = "edit-token-0123456789abcdef01"


def build_served_world(root: Path) -> TinyWorld:
    world = build_world(root)
    (world.model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return world


def make_served_state(world: TinyWorld, state: Path, n_edits: int = 2) -> None:
    """A state holding ``n_edits`` edits ``e0..``, snapshotted and closed."""
    from rlsedit.requests import parse_request
    from rlsedit.session.session import Session

    requests = [parse_request(r, i) for i, r in enumerate(edit_records(n_edits))]
    with Session.create(state, model=str(world.model), config=tiny_config(), runtime=tiny_runtime(world)) as s:
        if requests:
            s.edit(requests, batch_size=len(requests))


def write_tokens(path: Path) -> Path:
    path.write_text(json.dumps({"tokens": [
        {"name": "reader", "token": QUERY_TOKEN, "scopes": ["query"]},
        {"name": "curator", "token": EDIT_TOKEN, "scopes": ["edit"]},
    ]}))
    return path


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def wait_healthy(base_url: str, *, attempts: int = 600, pause: float = 0.1, process=None) -> dict:
    """Poll ``/health`` (a bounded number of times) until it answers."""
    for _ in range(attempts):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stderr.read()}")
        try:
            status, body = http("GET", base_url.replace("/v1", "") + "/health", timeout=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(pause)
    raise AssertionError(f"{base_url} did not become healthy")


@contextlib.contextmanager
def server_thread(world: TinyWorld | None, state: Path, *, tokens: Path | None = None, runtime=None,
                  **config) -> Iterator[tuple[str, object]]:
    """Serve ``state`` from uvicorn in a thread of this process; yields ``(base_url, service)``.
    The runtime is the tiny world's unless ``runtime`` is given."""
    import uvicorn

    from rlsedit.serve.app import create_app
    from rlsedit.serve.auth import TokenTable
    from rlsedit.serve.config import ServeConfig
    from rlsedit.serve.service import open_service

    service = open_service(state, runtime=runtime or tiny_runtime(world), config=ServeConfig(**config))
    app = create_app(service, tokens=TokenTable.from_file(tokens) if tokens else None)
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        wait_healthy(base)
        yield base, service
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        service.close()
        assert not thread.is_alive()


def start_server_process(world: TinyWorld, state: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``rlsedit serve --port 0`` in a subprocess; returns it and its base URL once healthy."""
    args = ["serve", "--state", str(state), "--port", "0", "--cache-dir", str(world.cache), *extra]
    process = subprocess.Popen(rlsedit_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=child_env(threads=1))
    line = process.stdout.readline()  # "rlsedit serving ... on http://127.0.0.1:PORT/v1"
    if "http://" not in line:
        process.kill()
        raise AssertionError(f"no address printed: {line!r} {process.stderr.read()}")
    base = line.strip().rsplit(" ", 1)[-1]
    wait_healthy(base, process=process)
    return process, base


def client(base: str, token: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=120)


def ask_greedy(world: TinyWorld, state: Path, prompt: str, max_new_tokens: int) -> str:
    """What ``rlsedit ask`` answers on ``state`` (its own code path, in this process)."""
    from rlsedit.session.cli import _ask
    from rlsedit.session.session import Session

    with Session.open(state, runtime=tiny_runtime(world)) as s:
        return _ask(s.lm, prompt, max_new_tokens)["completion"]


def http(method: str, url: str, body: bytes | str | dict | list | None = None, *, token: str | None = None,
         content_type: str = "application/json", timeout: float = 120) -> tuple[int, object]:
    """A raw HTTP request (for what the openai client cannot send); returns (status, parsed JSON)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    headers = {"Content-Type": content_type} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
