"""The streaming multipart parser of ``/upload`` (``api/uploads.py``) on crafted bodies, fed in
pieces of every size: what a client sends in one write may reach us in any split."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kcr_trio.api.uploads import parse_multipart
from kcr_trio.core.errors import ApiError

B = "zz"
FILE = b"hello\r\n--zz-not-a-boundary\r\n--z"  # data that looks like a boundary but is not


def form(preamble: bytes = b"", payload: bytes = FILE) -> bytes:
    return preamble + (
        f'--{B}\r\nContent-Disposition: form-data; name="entity_id"\r\n\r\nagent_1\r\n'
        f'--{B}\r\nContent-Disposition: form-data; name="file"; filename="a b.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode() + payload + f"\r\n--{B}--\r\n".encode()


async def parse(data: bytes, step: int, tmp_path: Path, max_bytes: int = 1000) -> tuple[dict[str, str], list[tuple[str, str, bytes]]]:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), step):
            yield data[i:i + step]

    parsed = await parse_multipart(pieces(), f"multipart/form-data; boundary={B}", spool_dir=tmp_path,
                                   max_file_bytes=max_bytes, max_files=3)
    try:
        for f in parsed.files:  # the digest the S3 PUT signs was taken from exactly the bytes spooled
            assert f.sha256 == hashlib.sha256(f.path.read_bytes()).hexdigest()
        return parsed.fields, [(f.filename, f.content_type, f.path.read_bytes()) for f in parsed.files]
    finally:
        parsed.cleanup()


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 11, 64, 100_000])
@pytest.mark.parametrize("preamble", [b"", b"a preamble, which RFC 2046 allows\r\n"])
async def test_any_split_gives_the_same_form(tmp_path: Path, step: int, preamble: bytes) -> None:
    fields, files = await parse(form(preamble), step, tmp_path)
    assert fields == {"entity_id": "agent_1"}
    assert files == [("a b.txt", "text/plain", FILE)]
    assert list(tmp_path.iterdir()) == []  # cleanup removed the spool file


async def test_large_file_spans_many_spool_batches(tmp_path: Path) -> None:
    payload = bytes(range(256)) * (3 * 1024 * 1024 // 256 + 7)  # over several spool write batches
    _, files = await parse(form(payload=payload), 256 * 1024, tmp_path, max_bytes=len(payload))
    assert files[0][2] == payload


@pytest.mark.parametrize("step", [1, 4096])
async def test_oversize_is_refused_while_arriving_and_leaves_nothing(tmp_path: Path, step: int) -> None:
    data = form(payload=b"x" * 5000)
    seen: list[int] = []

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), step):
            seen.append(i)
            yield data[i:i + step]

    with pytest.raises(ApiError) as err:
        await parse_multipart(pieces(), f"multipart/form-data; boundary={B}", spool_dir=tmp_path,
                              max_file_bytes=1000, max_files=3)
    assert err.value.status == 413
    assert seen[-1] < len(data) - 3000  # refused long before the body ended
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("body", [
    b"garbage without any boundary",
    form()[:-40],  # ends inside the file part
    f'--{B}\r\nContent-Disposition: form-data; name="x"\r\n\r\nv\r\n'.encode(),  # no closing delimiter
    f"--{B}\r\nno colon in this header line\r\n\r\nv\r\n--{B}--\r\n".encode(),
])
async def test_malformed_bodies_are_400(tmp_path: Path, body: bytes) -> None:
    with pytest.raises(ApiError) as err:
        await parse(body, 7, tmp_path)
    assert err.value.status == 400
    assert list(tmp_path.iterdir()) == []
