"""A strict, hand-written reader for the plain requests the API server sends, and the answer's head.

Why: h11 is correct for everything HTTP/1.1 allows, and pays for it on every request: its event
objects, header normalisation and state machine cost ~0.1 ms per request head and again per answer
on a cold-cache sidecar (measured per ``/execute``: bytes in → request ~120 µs, answer ~170 µs, of a
~1.7 ms total). The server's hop (``kcr_trio/backends/sidecar_wire.py``) and httpx only ever send
one shape: ``GET``/``POST``, ``HTTP/1.1``, one ``Host``, a ``Content-Length`` (or none on a GET),
no ``Transfer-Encoding``, no ``Expect``. That shape is recognised here, **strictly**: any byte that
is not plainly part of it (another method or version, obs-fold, odd spacing, a token or value
outside the RFC 9110 grammar, duplicate or unusual framing headers, ``Connection`` other than
``keep-alive``, a head over the size limit) makes :func:`parse_head` return ``None``, and the
connection hands every byte it has read to h11, which answers exactly as it did before.

The answer's head is built the way h11 writes it (``HTTP/1.1 <status> <reason>``, the app's
headers in order, ``name: value``), for answers that carry a ``Content-Length``.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import NamedTuple

_REQUEST_LINE = re.compile(rb"(GET|POST) (/[\x21-\x7e]*) HTTP/1\.1")
_FIELD = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?)[ \t]*")
_VALUE = re.compile(rb"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")
_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_DIGITS = re.compile(rb"[0-9]{1,15}")
# Headers whose presence changes how the message is framed or the connection is used: left to h11.
_FRAMING = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"))
REASONS = {int(s): s.phrase.encode() for s in HTTPStatus}


class Head(NamedTuple):
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values without surrounding whitespace
    length: int  # the body's Content-Length


def parse_head(head: bytes) -> Head | None:
    """``head``: the bytes before the blank line. ``None`` unless the request is the plain shape."""
    lines = head.split(b"\r\n")
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    hosts = 0
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:  # obs-fold, bare CR/LF, control bytes, obs-text, a bad token: h11 decides
            return None
        name, value = field.group(1).lower(), field.group(2)
        if name in _FRAMING:
            return None
        if name == b"content-length":
            if length >= 0 or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == b"connection" and value.lower() != b"keep-alive":
            return None
        headers.append((name, value))
    method = first.group(1)
    if hosts != 1 or (length < 0 and method == b"POST"):
        return None
    return Head(method, first.group(2), headers, max(length, 0))


def response_head(status: int, headers: list[tuple[bytes, bytes]], date: bytes) -> tuple[bytes, int] | None:
    """The answer's head as h11 writes it, and its Content-Length (``-1``: none, and the head then says
    ``connection: close``: the body is delimited by the close, as HTTP/1.1 allows). ``None`` for what
    the sidecar's app never sends and h11 would refuse or treat specially (a status without a body,
    several ``Content-Length``, framing headers, a name or value outside the grammar): the caller
    treats that as the app's error, as h11's ``LocalProtocolError`` was."""
    if not 200 <= status <= 599 or status in (204, 304):
        return None
    length = -1
    out = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
    for name, value in headers:
        low = name.lower()
        if _NAME.fullmatch(name) is None or _VALUE.fullmatch(value) is None or low in _FRAMING \
                or low == b"connection":
            return None
        if low == b"content-length":
            if length >= 0 or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        out.append(name + b": " + value + b"\r\n")
    if length < 0:
        out.append(b"connection: close\r\n")
    out.append(b"date: " + date + b"\r\n\r\n")
    return b"".join(out), length
