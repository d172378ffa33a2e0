"""API-key authentication, as KubeCodeRun 3.3.3 does it (``api-contract.md`` §3).

Order: ``X-API-Key`` header; ``Authorization: Bearer <key>`` or ``ApiKey <key>``; and only when no
header key was sent, for JSON bodies of POST/PUT/PATCH, the first non-blank of
``LIBRECHAT_CODE_API_KEY``, ``api_key``, ``apiKey`` (agents 3.1.70–3.1.79 send the key only there).
A header key always wins, so a wrong header key is a 401 even if the body holds a valid one.
Comparison is constant-time against every configured key.

A Bearer credential shaped like a JWT goes to ``api.jwt_auth`` instead when JWT auth is configured
(``KCR_AUTH_PROVIDER`` ``librechat-jwt`` or ``both``); in ``librechat-jwt`` mode API keys are refused.
Either way ``check`` returns the ``Principal`` (``api.principal``) the request acts as.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from kcr_trio.core.errors import Unauthorized

from .jwt_auth import JwtVerifier, looks_like_jwt
from .principal import Principal

if TYPE_CHECKING:
    from werkzeug.datastructures import Headers

log = logging.getLogger("kcr_trio.auth")

EXEMPT_PATHS = frozenset({"/health", "/ready", "/docs", "/redoc", "/openapi.json"})
BODY_KEY_FIELDS = ("LIBRECHAT_CODE_API_KEY", "api_key", "apiKey")


class Authenticator:
    def __init__(
        self,
        keys: Iterable[str],
        trusted_networks: str = "",
        *,
        exempt: Iterable[str] = (),
        jwt: JwtVerifier | None = None,
        accept_keys: bool = True,
    ) -> None:
        """``exempt``: more paths that need no key (``/metrics`` when ``KCR_METRICS_AUTH=false``).

        ``jwt``: verifies Bearer JWTs when set; ``accept_keys=False`` refuses API keys (JWT only).
        """
        self._keys = [k.encode() for k in keys] if accept_keys else []
        # A key's principal hashes the key: done once per configured key, not once per request.
        self._principals = {k: Principal.for_key(k.decode()) for k in self._keys}
        self.jwt = jwt
        self._exempt = EXEMPT_PATHS | frozenset(exempt)
        self._networks = []
        for item in trusted_networks.split(","):
            if item.strip():
                try:
                    self._networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError:
                    log.warning("ignoring invalid AUTH_TRUSTED_NETWORKS entry %r", item.strip())

    def is_exempt(self, method: str, path: str) -> bool:
        return method == "OPTIONS" or path in self._exempt

    def is_trusted(self, peer: str | None) -> bool:
        if not self._networks or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._networks)

    def header_key(self, headers: Mapping[str, str] | Headers) -> str | None:
        key = headers.get("x-api-key")
        if key:
            return key
        auth = headers.get("authorization", "")
        for scheme in ("Bearer ", "ApiKey "):
            if auth.startswith(scheme) and auth[len(scheme) :].strip():
                return auth[len(scheme) :].strip()
        return None

    @staticmethod
    def body_key(body: Any) -> str | None:
        if not isinstance(body, dict):
            return None
        for name in BODY_KEY_FIELDS:
            value = body.get(name)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None

    def check(self, key: str | None) -> Principal:
        """The principal ``key`` (an API key or a JWT) authenticates; ``Unauthorized`` otherwise."""
        if not key:
            raise Unauthorized("Missing API key")
        if self.jwt is not None and looks_like_jwt(key):
            return self.jwt.verify(key)
        candidate = key.encode()
        ok = False
        for valid in self._keys:  # no early exit: timing does not reveal which key matched
            ok |= hmac.compare_digest(candidate, valid)
        if not ok:
            raise Unauthorized("Invalid API key")
        return self._principals[candidate]
