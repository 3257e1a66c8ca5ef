"""The Ray authentication token sent with job requests.

Ray (2.52+) protects the dashboard / Jobs API and the cluster's gRPC services
with one static token when the cluster was started with ``RAY_AUTH_MODE=token``
(Ray 2.59+ turns it on by default for local ``ray.init()`` clusters, and
``ray start --head`` turns it on when a token is present). HTTP clients send it
as ``Authorization: Bearer <token>``.

Ray's own ``JobSubmissionClient`` adds that header only when *this* process
runs with ``RAY_AUTH_MODE=token``. raybary looks the token up itself, in Ray's
order of precedence, so that submitting needs no extra environment:

1. an explicit token (``--token``, or the ``RAY_AUTH_TOKEN`` environment variable);
2. a token file (``--token-file``, or ``RAY_AUTH_TOKEN_PATH``); an unreadable
   or empty file is an error, as in Ray;
3. ``~/.ray/auth_token`` (what ``ray get-auth-token --generate`` writes, and
   what ``cluster.yaml`` copies to every node), if it exists.

No token found: no header (fine for a cluster without token auth; one with it
answers 401, reported by :mod:`raybary.jobs.client` with what to do).

``raybary run`` joining a cluster (:mod:`raybary.runner.join`) finds its token
the same way, but sends it only to a cluster that refuses a request without
one: a token file left over from another cluster never reaches, nor breaks,
a cluster without token authentication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from raybary.errors import RaybaryError

__all__ = ["Token", "resolve_token", "auth_headers", "default_token_path", "TokenError"]

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    """``~/.ray/auth_token`` (read when called, so a changed ``HOME`` counts)."""
    return Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class Token:
    """A token and where it came from (for messages; the value is never printed)."""

    value: str
    source: str


class TokenError(RaybaryError, ValueError):
    """A token file was named but cannot be used."""


def resolve_token(token: str | None = None, token_file: str | os.PathLike | None = None,
                  *, env: dict | None = None) -> Token | None:
    """The token to send, following the order in the module docstring.

    ``token`` / ``token_file`` are explicit values (CLI options); ``env``
    defaults to ``os.environ``.
    """
    env = os.environ if env is None else env
    if token is not None and token.strip():
        return Token(token.strip(), "--token")
    if env.get(TOKEN_ENV, "").strip():
        return Token(env[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    path, source = None, None
    if token_file is not None:
        path, source = Path(token_file).expanduser(), "--token-file"
    elif env.get(TOKEN_PATH_ENV):
        path, source = Path(env[TOKEN_PATH_ENV]).expanduser(), f"${TOKEN_PATH_ENV}"
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise TokenError(f"cannot read the Ray token file {path} ({source}): "
                             f"{e.strerror or e}") from None
        if not value:
            raise TokenError(f"the Ray token file {path} ({source}) is empty")
        return Token(value, f"{source} {path}")
    default = default_token_path()
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return Token(value, str(default)) if value else None


def auth_headers(token: Token | None) -> dict[str, str]:
    """HTTP headers for ``token`` (empty without one)."""
    return {"Authorization": f"Bearer {token.value}"} if token is not None else {}
