"""Reading one HTTP/1.1 response with h11: the loop our two small clients share.

``backends/sidecar_wire.py`` (the server's kept-alive hop to a local sidecar, on the path of every
``/exec``) and ``bench/lean.py`` (the bench's latency client) both read a response the same way:
feed the socket's bytes to an ``h11.Connection`` until the message ends, collecting the status,
the headers and the body. It lives here, outside both packages, because the bench must not import
the backends (``tests/unit/test_import_graph.py``).

The wire reads a plain sized answer without h11 (``sidecar_wire``: it cost ~190 Python calls per
run) and comes here for anything else, so h11 still decides every unusual or broken answer.
Failures are raised as the ``httpx`` exceptions both callers already map.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import httpx

__all__ = ["read_response"]


async def read_response(
    conn: h11.Connection, receive: Callable[[], Awaitable[bytes]], *, closed: str,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` of the response ``conn`` expects, reading with ``receive``
    (``b""`` at the end of the stream). ``closed``: the message when the peer closed the
    connection before a response began. h11's own errors (``h11.ProtocolError``) pass through."""
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await receive())
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            raise httpx.RemoteProtocolError(closed)
        # h11.InformationalResponse (100 Continue): nothing to do
