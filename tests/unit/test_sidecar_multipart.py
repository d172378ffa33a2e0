"""The sidecar's streaming multipart parser, fed at every possible split point."""

from __future__ import annotations

import pytest

from sidecar.multipart import MultipartError, Parser, boundary_of

BOUNDARY = b"XyZ123"
BODY = (b"preamble\r\n--XyZ123\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a b.txt\"\r\n"
        b"Content-Type: text/plain\r\n\r\nhello\r\n--XyZ12 not a boundary\r\n--XyZ123\r\n"
        b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''caf%C3%A9.csv\r\n\r\n"
        b"1,2\r\n--XyZ123--\r\nepilogue")


def collect(chunks: list[bytes]) -> list[tuple[str | None, bytes]]:
    parser = Parser(BOUNDARY)
    parts: list[tuple[str | None, bytes]] = []
    done = False
    for chunk in chunks:
        for kind, value in parser.feed(chunk):
            if kind == "part":
                parts.append((value.filename, b""))  # type: ignore[union-attr]
            elif kind == "data":
                name, data = parts[-1]
                parts[-1] = (name, data + value)  # type: ignore[operator]
            elif kind == "done":
                done = True
    assert done
    return parts


def test_whole_body() -> None:
    assert collect([BODY]) == [("a b.txt", b"hello\r\n--XyZ12 not a boundary"), ("café.csv", b"1,2")]


@pytest.mark.parametrize("split", range(1, len(BODY)))
def test_every_split_point(split: int) -> None:
    assert collect([BODY[:split], BODY[split:]]) == collect([BODY])


def test_byte_by_byte() -> None:
    assert collect([bytes([b]) for b in BODY]) == collect([BODY])


def test_boundary_of() -> None:
    assert boundary_of('multipart/form-data; boundary="abc def"') == b"abc def"
    assert boundary_of("multipart/form-data; charset=utf-8; boundary=xyz") == b"xyz"
    assert boundary_of("application/json") is None


def test_malformed() -> None:
    with pytest.raises(MultipartError):
        Parser(b"b").feed(b"--bXX")
