# Bearer tokens of the REST API and what each scope may call. Rules: a token is shown
# once, only its sha256 is kept; `admin` may call every route, `proxy` only the routes
# a proxy needs (edge state and changes, quota leases, throttles, meter events); each
# request looks its token up in the store, so a revocation holds from the next request.
from __future__ import annotations

import hashlib
import os
import secrets
from typing import NamedTuple

from control_plane.store import Store, Token

ADMIN = "admin"
PROXY = "proxy"
# scope -> the routes (method, path as in api.ROUTES) its tokens may call; None: all.
SCOPE_ROUTES: dict[str, frozenset[tuple[str, str]] | None] = {
    ADMIN: None,
    PROXY: frozenset({
        ("GET", "/v1/edge/state"),
        ("GET", "/v1/edge/changes"),
        ("POST", "/v1/edge/leases"),
        ("POST", "/v1/edge/leases/return"),
        ("POST", "/v1/edge/throttles"),
        ("POST", "/v1/events"),
    }),
}
SCOPES = tuple(SCOPE_ROUTES)


class Principal(NamedTuple):
    """Who called: the token's `id`, `name` and `scope` (request["principal"])."""

    id: str
    name: str
    scope: str

    @property
    def author(self) -> str:
        """Who this is in the audit trail: `token <id> (<name>)`."""
        return f"token {self.id} ({self.name})"


def command_author(command: str) -> str:
    """Who a command run on a machine is in the audit trail: `<command> (<OS user>)`."""
    import getpass
    try:
        user = getpass.getuser()
    except (KeyError, OSError):              # no name for this uid (a bare container)
        user = f"uid {os.getuid()}"
    return f"{command} ({user})"


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def scope_allows(scope: str, method: str, path: str) -> bool:
    """Whether a token of `scope` may call the route `method path` (the route's
    template, e.g. `/v1/{section}/{key}`); an unknown scope may call nothing."""
    routes = SCOPE_ROUTES.get(scope, frozenset())
    return routes is None or (method, path) in routes


def scopes_allowing(method: str, path: str) -> list[str]:
    """The scopes whose tokens may call the route `method path`, narrowest first."""
    return sorted((scope for scope in SCOPES if scope_allows(scope, method, path)),
                  key=lambda scope: SCOPE_ROUTES[scope] is None)


async def create_token(store: Store, name: str, now: float, scope: str = ADMIN, *,
                       author: str) -> tuple[Token, str]:
    """A new live token of `scope` named `name`, created at `now` by `author` (as the
    audit trail names who): (the stored Token, the secret itself, shown once:
    `aforo_<scope>_...`). Raises ValueError for a scope not in SCOPES or an empty name."""
    if scope not in SCOPE_ROUTES:
        raise ValueError(f"the scope is one of {', '.join(SCOPES)}, not `{scope}`")
    if not name.strip():
        raise ValueError("a token needs a name (who or what uses it)")
    secret = f"aforo_{scope}_" + secrets.token_urlsafe(32)
    token = Token("tok_" + secrets.token_hex(8), name, scope, now)
    await store.add_token(token, sha256_hex(secret), author=author)
    return token, secret
