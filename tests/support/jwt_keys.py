"""Test keys and token minting for LibreChat-style Code API JWTs (EdDSA and RS256).

Keys are generated per test session (never stored in the repo); tokens carry the claims current
LibreChat mints (contract §1.0): ``aud`` codeapi, ``iss`` librechat, ``sub``, ``tenant_id``, ``role``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@dataclass
class SigningKey:
    alg: str
    private: Any
    kid: str

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.OKPAlgorithm if self.alg == "EdDSA" else jwt.algorithms.RSAAlgorithm
        data: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def mint(self, *, sub: str = "user-1", tenant_id: str = "tenant-a", lifetime: int = 300,
             iat: float | None = None, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time() if iat is None else iat)
        payload = {"iss": "librechat", "aud": "codeapi", "sub": sub, "tenant_id": tenant_id, "role": "user",
                   "principal_source": "user", "iat": now, "exp": now + lifetime, "jti": uuid.uuid4().hex}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})


def ed25519_key(kid: str = "ed-1") -> SigningKey:
    return SigningKey("EdDSA", ed25519.Ed25519PrivateKey.generate(), kid)


def rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048), kid)


def write_pem(key: SigningKey, directory: Path) -> Path:
    path = directory / f"{key.kid}.pem"
    path.write_bytes(key.public_pem())
    return path


def write_jwks(keys: list[SigningKey], directory: Path) -> Path:
    path = directory / "jwks.json"
    path.write_text(json.dumps({"keys": [k.jwk() for k in keys]}))
    return path


def unsigned_token(**claims: Any) -> str:
    """An ``alg: none`` token (what an attacker would send), built by hand: no library signs these."""
    import base64

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    payload = {"iss": "librechat", "aud": "codeapi", "sub": "attacker", "iat": now, "exp": now + 60, **claims}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."
