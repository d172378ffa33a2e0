"""Protocol edges below the app (audit finding 12): answers Hypercorn gives on its own, and
requests whose framing is ambiguous.

* **Rejections have JSON bodies.** Hypercorn answers what h11 refuses to parse (400 malformed,
  431 header block too large, 501 unknown transfer coding) with an empty body. Every other error of
  ours is a JSON body in KubeCodeRun's shape B, and clients (and the model reading a tool error)
  deserve the same here: :func:`install_json_rejections` makes Hypercorn's error responses carry one.
  It replaces one method of Hypercorn's HTTP/1.1 protocol class, process-wide; the sidecar's own
  HTTP server does not use Hypercorn and is unaffected.
* **Content-Length together with Transfer-Encoding** (RFC 9112 §6.3): the body is read as chunked,
  but such a request is how request smuggling starts, and the RFC says the connection must be
  closed after the response. :class:`CloseAmbiguousFraming` adds ``Connection: close``.
"""

from __future__ import annotations

import time
from itertools import chain
from typing import Any

from kcr_trio.core.ids import new_id

from .errors import dumps

_REJECTIONS = {
    400: ("Malformed HTTP request", "validation"),
    408: ("Request timed out", "timeout"),
    413: ("Request too large", "resource_exhausted"),
    431: ("Request header fields too large", "validation"),
    501: ("Not implemented: unsupported transfer coding or method", "validation"),
}


def rejection_body(status: int) -> bytes:
    message, error_type = _REJECTIONS.get(status, ("Request rejected", "validation" if status < 500 else "internal_server"))
    return dumps({"error": message, "error_type": error_type, "details": None, "request_id": new_id(),
                  "timestamp": time.time()})


def install_json_rejections() -> None:
    """Give Hypercorn's own HTTP/1.1 error responses a JSON body (idempotent)."""
    import h11
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_kcr_json_rejections", False):
        return

    async def _send_error_response(self: Any, status_code: int) -> None:
        body = rejection_body(status_code)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self._send_h11_event(
            h11.Response(status_code=status_code, headers=list(chain(headers, self.config.response_headers("h11"))))
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
    H11Protocol._kcr_json_rejections = True  # type: ignore[attr-defined]


class CloseAmbiguousFraming:
    """ASGI wrapper: ``Connection: close`` on the answer to a request with both length headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name.lower() for name, _ in scope.get("headers", ())}
        if not (b"content-length" in names and b"transfer-encoding" in names):
            await self.app(scope, receive, send)
            return

        async def closing_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)
