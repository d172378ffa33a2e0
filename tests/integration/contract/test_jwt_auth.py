"""JWT auth on the wire (contract §1.0): LibreChat's short-lived tokens beside API keys.

In-process servers on real loopback sockets; tokens are minted here with keys generated per test.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import jwt
import pytest

from kcr_trio.api.jwt_auth import JwtConfigError
from kcr_trio.app import build_authenticator
from tests.support.jwt_keys import ed25519_key, rsa_key, unsigned_token, write_jwks, write_pem
from tests.support.ops import H, ops_server
from tests.support.server import make_settings

pytestmark = pytest.mark.integration

ED = ed25519_key()
RSA = rsa_key()
OTHER = ed25519_key("ed-other")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_eddsa_and_rs256_tokens_authenticate_and_failures_are_401(tmp_path: Path) -> None:
    jwks = write_jwks([ED, RSA], tmp_path)
    async with ops_server(tmp_path, kcr_jwt_jwks_file=jwks, kcr_auth_failures_per_minute=0) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            for key in (ED, RSA):
                r = await client.post(url + "/exec", json={"code": "ok", "lang": "py"}, headers=bearer(key.mint()))
                assert r.status_code == 200, r.text
                assert r.json()["stdout"].strip() == "done"
            # API keys keep working beside JWTs ("auto" with a key configured = "both").
            assert (await client.get(url + "/files/x", headers=H)).status_code == 200

            now = time.time()
            cases = {
                "Token expired": ED.mint(iat=now - 400, lifetime=300),
                "Invalid token signature": OTHER.mint(headers={"kid": ED.kid}),
                "Invalid token audience": ED.mint(aud="someone-else"),
                "Invalid token issuer": ED.mint(iss="evil"),
                "Invalid token: algorithm 'none' is not accepted": unsigned_token(),
                "Token lifetime exceeds 300 s": ED.mint(lifetime=3600),
                "Invalid token: missing claim sub": ED.mint(sub=None),
                "Invalid token: missing claim exp": jwt.encode(
                    {"iss": "librechat", "aud": "codeapi", "sub": "u", "iat": int(now)}, ED.private,
                    algorithm="EdDSA", headers={"kid": ED.kid}),
                "Invalid token: unknown signing key": OTHER.mint(),
            }
            for message, token in cases.items():
                r = await client.get(url + "/files/x", headers=bearer(token))
                assert r.status_code == 401, (message, r.text)
                assert r.json()["error"] == message
                r = await client.post(url + "/exec", json={"code": "ok", "lang": "py"}, headers=bearer(token))
                assert r.status_code == 401 and r.json()["error"] == message


async def test_public_key_confusion_with_hs256_is_refused(tmp_path: Path) -> None:
    pem = write_pem(ED, tmp_path)
    async with ops_server(tmp_path, kcr_jwt_public_key_file=pem) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url + "/files/x", headers=bearer(ED.mint()))).status_code == 200
            # Signing with the *public* key as an HMAC secret: the classic algorithm confusion.
            now = int(time.time())
            forged = jwt.encode({"iss": "librechat", "aud": "codeapi", "sub": "x", "iat": now, "exp": now + 60},
                                "secret-we-do-not-accept-0123456789abcdef", algorithm="HS256")
            r = await client.get(url + "/files/x", headers=bearer(forged))
            assert r.status_code == 401 and "algorithm 'HS256'" in r.json()["error"]


async def test_jwt_only_mode_refuses_api_keys(tmp_path: Path) -> None:
    pem = write_pem(RSA, tmp_path)
    async with ops_server(tmp_path, kcr_jwt_public_key_file=pem, kcr_auth_provider="librechat-jwt") as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url + "/files/x", headers=H)).status_code == 401
            assert (await client.get(url + "/files/x", headers=bearer(RSA.mint()))).status_code == 200


def test_jwt_mode_without_a_key_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(JwtConfigError, match="KCR_JWT_PUBLIC_KEY_FILE"):
        build_authenticator(make_settings(tmp_path, kcr_auth_provider="librechat-jwt"))
    with pytest.raises(JwtConfigError, match="asymmetric"):
        build_authenticator(make_settings(tmp_path, kcr_jwt_public_key_file=write_pem(ED, tmp_path),
                                          kcr_jwt_algorithms="HS256"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(JwtConfigError, match="cannot load"):
        build_authenticator(make_settings(tmp_path, kcr_jwt_public_key_file=bad))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KCR_AUTH_PROVIDER": "librechat-jwt"}, "JWT auth needs KCR_JWT_PUBLIC_KEY_FILE or KCR_JWT_JWKS_FILE"),
        ({"KCR_EXECUTION_PROFILES": "fast"}, "KCR_EXECUTION_PROFILES must list default and/or stateful"),
    ],
)
def test_serve_refuses_a_bad_auth_or_profile_setup_in_one_line(tmp_path: Path, env: dict[str, str],
                                                                message: str) -> None:
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "KCR_"))}
    full.update({"KCR_DATA_DIR": str(tmp_path), "API_HOST": "127.0.0.1", "API_PORT": "0", **env})
    done = subprocess.run([sys.executable, "-m", "kcr_trio", "serve"], env=full, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert f"kcr-trio: refusing to start: {message}" in done.stderr
    assert "Traceback" not in done.stderr
