"""Who is calling: the authenticated principal, as one explicit value.

Authentication (``api.auth``: API keys; ``api.jwt_auth``: LibreChat's short-lived JWTs) ends in a
``Principal``. Everything that must belong to a caller — stateful runtime sessions (``core.runtime``),
PTC continuations — is keyed by ``Principal.id``, an opaque string: code downstream never needs to
know which scheme produced it, and two schemes can never collide because the id carries the scheme.

* API key: ``key:<16 hex of sha256(key)>`` — the key itself is never stored or logged.
* JWT: ``jwt:<tenant_id>:<sub>`` — LibreChat's ``tenant_id`` partitions users of one LibreChat
  (contract §1.0: ``sub``, ``tenant_id``); tokens without a tenant use ``-``.
* Trusted network (``AUTH_TRUSTED_NETWORKS``): ``trusted`` — one shared principal, as the network
  itself is the credential.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from quart import g


@dataclass(frozen=True, slots=True)
class Principal:
    scheme: Literal["api_key", "jwt", "trusted"]
    subject: str  # key id, JWT ``sub``, or "trusted"
    tenant_id: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        if self.scheme == "api_key":
            return f"key:{self.subject}"
        if self.scheme == "jwt":
            return f"jwt:{self.tenant_id or '-'}:{self.subject}"
        return "trusted"

    @classmethod
    def for_key(cls, key: str) -> Principal:
        return cls("api_key", hashlib.sha256(key.encode()).hexdigest()[:16])


TRUSTED = Principal("trusted", "trusted")


def current_principal() -> Principal | None:
    """The principal of the request being served (``None`` on routes that need no auth).

    Set by the app's auth hook; for JSON routes whose key travels in the body, set once the handler
    has checked it.
    """
    value = g.get("principal")
    return value if isinstance(value, Principal) else None


def current_principal_id() -> str | None:
    principal = current_principal()
    return principal.id if principal is not None else None
