"""``rlsedit serve``: open a state and serve it until interrupted."""

from __future__ import annotations

import ipaddress
import socket
import sys

from ..errors import InvalidRequestError


def register(sub) -> None:
    from ..session.cli import _runtime_args

    p = sub.add_parser("serve", help="serve a state over an OpenAI-compatible HTTP API that also takes edits "
                       "(needs the 'serve' extra: pip install rlsedit[serve])")
    p.add_argument("--state", required=True, help="state directory (made by 'rlsedit edit' or 'demo --state')")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the address is printed)")
    p.add_argument("--tokens", default=None, help="JSON tokens file with scopes query/edit (see rlsedit.serve.auth)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow binding a non-loopback address without a tokens file (anyone can edit)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a query may ask for")
    p.add_argument("--max-batch-rows", type=int, default=32, help="query rows decoded together")
    p.add_argument("--edit-batch-size", type=int, default=16, help="edits written as one batch at most")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413")
    _runtime_args(p)
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (made here so that port 0 can be reported)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidRequestError(f"cannot bind {host}:{port}: {exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
        from .auth import TokenTable
    except ImportError as exc:
        raise InvalidRequestError(f"'rlsedit serve' needs the serve extra ({exc}): pip install 'rlsedit[serve]'") \
            from None
    from ..session.cli import _runtime
    from .config import ServeConfig
    from .service import open_service

    if not is_loopback(args.host) and args.tokens is None and not args.insecure_no_auth:
        raise InvalidRequestError(
            f"refusing to serve on {args.host} without --tokens: anyone who can reach it could query and edit the "
            "model; give a tokens file, bind 127.0.0.1, or pass --insecure-no-auth")
    try:
        config = ServeConfig(max_tokens_limit=args.max_tokens_limit, max_batch_rows=args.max_batch_rows,
                             edit_batch_size=args.edit_batch_size, max_body_bytes=args.max_body_bytes)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    tokens = TokenTable.from_file(args.tokens) if args.tokens else None
    sock = bind(args.host, args.port)
    try:
        service = open_service(args.state, runtime=_runtime(args), config=config)
        try:
            app = create_app(service, tokens=tokens)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"rlsedit serving {args.state} ({service.model_id}, weight version {service.live.version}) "
                  f"on http://{shown}:{port}/v1", flush=True)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
            server.run(sockets=[sock])
        finally:
            service.close()
    finally:
        sock.close()
    print("rlsedit serve: stopped", file=sys.stderr)
    return 0
