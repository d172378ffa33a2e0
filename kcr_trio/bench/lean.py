"""A lean HTTP/1.1 client for latency rounds: h11 on one kept-alive Trio TCP connection.

Why: ``bench engine`` measures ``/exec`` of a trivial program at c=1 against a fraction of a bare
interpreter start, so what the client itself costs counts against the server. httpx on Trio costs
~1-3 ms per request here (its ``GET /health`` p50 read 4.4-5.9 ms on the shared machine while the
server's own answer took <1 ms), which is a large part of a ~10 ms ``/exec``. This client is still an
honest HTTP/1.1 client over TCP (a real socket, a kept-alive connection, Content-Length or chunked
bodies parsed by h11, the whole body read before the clock stops), it just does nothing else.
It offers the two calls the latency rounds make, shaped like httpx's (``post(path, json=...)``,
``get(path)`` → an object with ``status_code`` and ``content``); failures raise ``httpx.HTTPError``
subclasses, so the rounds count them exactly as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import httpx
import trio

from kcr_trio.http1 import read_response


@dataclass(frozen=True, slots=True)
class LeanResponse:
    status_code: int
    content: bytes


class LeanClient:
    """``base_url`` (``http://host:port``), ``headers`` sent with every request."""

    def __init__(self, base_url: str, *, headers: dict[str, str], timeout: float = 120.0) -> None:
        url = httpx.URL(base_url)
        if url.scheme != "http":
            raise ValueError("the lean latency client speaks plain HTTP only")
        self.host, self.port = url.host, url.port or 80
        self.timeout = timeout
        self._headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None

    async def aclose(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            await stream.aclose()

    async def post(self, path: str, *, json: Any) -> LeanResponse:
        return await self._request("POST", path, _dumps(json))

    async def get(self, path: str) -> LeanResponse:
        return await self._request("GET", path, None)

    async def _request(self, method: str, path: str, body: bytes | None) -> LeanResponse:
        done = False
        try:
            with trio.fail_after(self.timeout):
                if self._stream is None:
                    self._stream = await trio.open_tcp_stream(self.host, self.port)
                    self._conn = h11.Connection(h11.CLIENT)
                assert self._conn is not None
                conn, stream = self._conn, self._stream
                headers = [(b"host", f"{self.host}:{self.port}".encode()), *self._headers]
                if body is not None:
                    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                data = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
                if body is not None:
                    data += conn.send(h11.Data(data=body)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(data)
                status, _, content = await read_response(
                    conn, partial(stream.receive_some, 65536), closed="the server closed the connection")
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    done = True
                return LeanResponse(status, content)
        except trio.TooSlowError:
            raise httpx.ReadTimeout(f"no answer within {self.timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.ReadError(str(exc)) from None
        except h11.ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None
        finally:
            if not done:  # failed, cancelled or "Connection: close": the next request reconnects
                dropped, self._stream, self._conn = self._stream, None, None
                if dropped is not None:
                    dropped.socket.close()


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()
