"""The S3 PUT we sign ourselves (``s3_put.sign_v4``) carries the same Signature V4 as botocore's
signer computes for the same request. moto does not check signatures, so this is the test that
would catch a wrong canonical request before a real S3 or MinIO refuses every upload."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kcr_trio.backends.s3_put import sign_v4

NOW = datetime(2026, 12, 5, 10, 21, 40, tzinfo=UTC)


def botocore_authorization(host: str, path: str, headers: dict[str, str], body: bytes, region: str) -> str:
    request = AWSRequest(method="PUT", url=f"http://{host}{path}", data=body, headers=dict(headers))
    request.headers["X-Amz-Date"] = NOW.strftime("%Y%m%dT%H%M%SZ")
    request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
    request.context["timestamp"] = NOW.strftime("%Y%m%dT%H%M%SZ")
    auth = SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), "s3", region)
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    scope = f"{NOW:%Y%m%d}/{region}/s3/aws4_request"
    return (f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{scope}, "
            f"SignedHeaders={auth.signed_headers(auth.headers_to_sign(request))}, Signature={signature}")


@pytest.mark.parametrize(("host", "key", "content_type", "region"), [
    ("127.0.0.1:9000", "sessions/abc/uploads/def", "application/octet-stream", "us-east-1"),
    ("minio.example:443", "sessions/x_y/outputs/a-b.c~d", "text/plain;  charset=utf-8", "eu-west-3"),
])
def test_signature_matches_botocore(host: str, key: str, content_type: str, region: str) -> None:
    body = b"some bytes of the file" * 100
    path = f"/kubecoderun-files/{key}"
    headers = {"Content-Length": str(len(body)), "Content-Type": content_type}
    ours = sign_v4("PUT", host, path, headers, hashlib.sha256(body).hexdigest(), access_key="AKIDEXAMPLE",
                   secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", region=region, now=NOW)
    theirs = botocore_authorization(host, path, {**headers, "Host": host}, body, region)
    assert ours["authorization"] == theirs
    assert ours["x-amz-date"] == "20261205T102140Z"
    assert ours["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()


def test_the_payload_digest_is_signed() -> None:
    args = dict(access_key="AK", secret_key="SK", region="us-east-1", now=NOW)
    one = sign_v4("PUT", "h:1", "/b/k", {"content-length": "3"}, "a" * 64, **args)  # type: ignore[arg-type]
    two = sign_v4("PUT", "h:1", "/b/k", {"content-length": "3"}, "b" * 64, **args)  # type: ignore[arg-type]
    assert one["authorization"] != two["authorization"]
