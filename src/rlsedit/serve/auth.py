"""Bearer tokens with scopes, as a FastAPI dependency on each route.

Tokens file (JSON)::

    {"tokens": [{"name": "app", "token": "<secret>", "scopes": ["query"]},
                {"name": "curator", "token": "<secret>", "scopes": ["query", "edit"]}]}

``query`` may call the completion, chat, model and read-only edit/state routes; ``edit`` may
also post and undo edits (it implies ``query``). A missing or unknown token is 401, a known
token without the route's scope 403, both in OpenAI's error format. Tokens are compared as
sha256 digests with :func:`hmac.compare_digest` against every known token (no early exit),
so the time taken says nothing about how much of a token matched, nor about its length.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import InvalidRequestError
from .errors import AuthenticationError, PermissionDeniedError

SCOPES = ("query", "edit")
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


class TokenTable:
    """The known tokens (as sha256 digests) and their scopes."""

    def __init__(self, entries: list[tuple[str, str, frozenset[str]]]) -> None:
        self._entries = [(hashlib.sha256(token.encode()).digest(), Principal(name, scopes))
                         for name, token, scopes in entries]

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidRequestError(f"tokens file {str(path)!r} cannot be read: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"tokens file {str(path)!r} is not valid JSON: {exc}") from None
        items = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(items, list) or not items:
            raise InvalidRequestError(f"tokens file {str(path)!r} must hold {{\"tokens\": [...]}} with at least one token")
        entries, seen = [], set()
        for i, item in enumerate(items):
            where = f"tokens file {str(path)!r}, token #{i}"
            if not isinstance(item, dict):
                raise InvalidRequestError(f"{where}: expected an object with name, token, scopes")
            token, scopes, name = item.get("token"), item.get("scopes"), item.get("name", f"token-{i}")
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise InvalidRequestError(f"{where}: 'token' must be a string of at least {MIN_TOKEN_LENGTH} characters")
            if token in seen:
                raise InvalidRequestError(f"{where}: the same token occurs twice")
            seen.add(token)
            if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
                raise InvalidRequestError(f"{where}: 'scopes' must be a non-empty list of {list(SCOPES)}, got {scopes!r}")
            if not isinstance(name, str):
                raise InvalidRequestError(f"{where}: 'name' must be a string")
            granted = set(scopes) | ({"query"} if "edit" in scopes else set())
            entries.append((name, token, frozenset(granted)))
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, principal in self._entries:  # every entry, whatever matched
            if hmac.compare_digest(digest, known):
                found = principal
        return found


_bearer = HTTPBearer(auto_error=False, description="a token from the server's tokens file")

ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


def require(scope: str):
    """A dependency that admits a request whose bearer token has ``scope`` (or any request
    when the server runs without a tokens file)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def check(request: Request,
              credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        table: TokenTable | None = request.app.state.tokens
        if table is None:
            return ANONYMOUS
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise AuthenticationError("missing bearer token: send 'Authorization: Bearer <token>'",
                                      code="missing_api_key")
        principal = table.lookup(credentials.credentials)
        if principal is None:
            raise AuthenticationError("invalid bearer token", code="invalid_api_key")
        if scope not in principal.scopes:
            raise PermissionDeniedError(f"token {principal.name!r} lacks the {scope!r} scope this route needs",
                                        code="insufficient_scope")
        return principal

    return check
