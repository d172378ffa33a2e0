"""Verification of LibreChat's short-lived Code API tokens (contract §1.0, "Auth headers").

Current LibreChat (``CODEAPI_AUTH_PROVIDER=librechat-jwt|both``) sends
``Authorization: Bearer <JWT>``: EdDSA or RS256, ``aud`` ``codeapi``, ``iss`` ``librechat``, a
lifetime of at most 300 s, and the claims ``sub``, ``tenant_id``, ``role``, ... We verify it with
PyJWT (a maintained library: signature, ``exp``/``nbf``/``iat``, audience, issuer) against a public key
(PEM) or a JWKS file from the configuration, and add the checks PyJWT leaves to us:

* only the configured asymmetric algorithms — ``alg: none`` and HS256 (which would let anyone who
  knows the *public* key sign) are refused before any key is used;
* ``exp`` and ``iat`` are required and ``exp - iat`` must not exceed the configured lifetime, so a
  leaked token is worth minutes, not days, whatever its issuer was configured to mint;
* ``sub`` is required: it becomes the principal (``api.principal``).

Every failure is a 401 with a message saying which check failed (never the token or the key).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kcr_trio.core.errors import Unauthorized

from .principal import Principal

log = logging.getLogger("kcr_trio.auth.jwt")

ASYMMETRIC = frozenset({"EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"})


class JwtConfigError(ValueError):
    """The JWT settings cannot work (no key, unreadable file, symmetric algorithm...)."""


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments whose first decodes to a JSON header: worth verifying as a JWT.

    API keys (``secrets.token_urlsafe``) have no dots, so a presented credential is routed to the
    right check without trying both.
    """
    if token.count(".") != 2:
        return False
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return False
    return isinstance(header, dict) and "alg" in header


class JwtVerifier:
    def __init__(
        self,
        *,
        public_key_file: Path | None,
        jwks_file: Path | None,
        audience: str,
        issuer: str,
        algorithms: list[str],
        max_lifetime: int,
        leeway: float,
    ) -> None:
        bad = [a for a in algorithms if a not in ASYMMETRIC]
        if bad or not algorithms:
            raise JwtConfigError(f"KCR_JWT_ALGORITHMS must list asymmetric algorithms only, got {algorithms}")
        self.audience = audience
        self.issuer = issuer
        self.algorithms = list(algorithms)
        self.max_lifetime = max_lifetime
        self.leeway = leeway
        self._key: Any = None
        self._jwks: dict[str | None, Any] = {}
        if public_key_file is None and jwks_file is None:
            raise JwtConfigError("JWT auth needs KCR_JWT_PUBLIC_KEY_FILE or KCR_JWT_JWKS_FILE")
        try:
            if public_key_file is not None:
                self._key = load_pem_public_key(Path(public_key_file).read_bytes())
            if jwks_file is not None:
                keyset = jwt.PyJWKSet.from_dict(json.loads(Path(jwks_file).read_text()))
                for item in keyset.keys:
                    self._jwks[item.key_id] = item.key
        except (OSError, ValueError, TypeError, jwt.PyJWTError) as exc:
            raise JwtConfigError(f"cannot load the JWT verification key: {exc}") from exc

    def _key_for(self, header: dict[str, Any]) -> Any:
        kid = header.get("kid")
        if self._jwks:
            if kid in self._jwks:
                return self._jwks[kid]
            if kid is None and len(self._jwks) == 1 and self._key is None:
                return next(iter(self._jwks.values()))
        if self._key is not None:
            return self._key
        raise Unauthorized("Invalid token: unknown signing key")

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("Invalid token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthorized(f"Invalid token: algorithm {str(alg)[:16]!r} is not accepted")
        key = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("Invalid token audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("Invalid token issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("Invalid token signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"Invalid token: missing claim {exc.claim}") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("Token not yet valid") from None
        except jwt.PyJWTError as exc:
            log.info("JWT rejected: %s", type(exc).__name__)
            raise Unauthorized("Invalid token") from None
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)) or exp - iat > self.max_lifetime:
            raise Unauthorized(f"Token lifetime exceeds {self.max_lifetime} s")
        sub, tenant = claims.get("sub"), claims.get("tenant_id")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("Invalid token: missing claim sub")
        return Principal("jwt", sub, tenant if isinstance(tenant, str) and tenant else None, claims)
