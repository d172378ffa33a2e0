"""Which answers close their connection: the LibreChat hang-up cure, only where it is needed.

``keepalive.md``: the hang-up needs a socket that **axios** used (follow-redirects leaves a
``socket.destroy`` listener on it), returned to Node's shared keep-alive pool, then reused by
LibreChat's node-fetch ``POST /exec`` that stays silent for 5 s. The cure is to close the sockets
axios used, so that none of them ever returns to the pool. Other clients (curl, wrk, Python clients,
proxies, other integrations) carry no such listener, and closing their connections after every
``/files`` answer cost them about 20 % of their throughput for nothing.

The rule (:func:`closes_connection`), applied to the routes LibreChat fetches with axios
(``CLOSE_PREFIXES``: ``/files/``, ``/download/``, ``/upload``, ``/sessions/``):

* ``User-Agent: LibreChat/…``: every LibreChat build sends it on its axios calls (the file priming
  ``GET /files``, uploads, downloads, freshness checks; ``api-contract.md`` §2.2, §6.2), so the socket
  is closed even when axios's own defaults are overridden;
* or the request looks like axios itself: ``User-Agent: axios/…`` (axios's default) or axios's default
  ``Accept: application/json, text/plain, */*`` (a header no other common client sends as such), so a
  LibreChat fork with another user agent, or any Node integration on axios, keeps the cure.

Everything else keeps its connection. ``KCR_CONNECTION_CLOSE_CLIENTS=all`` restores the old answer
(close for every client on those routes), ``KCR_CONNECTION_CLOSE=false`` turns the cure off.
Behind a proxy this header only ever concerned the proxy's upstream connection (``Connection`` is
hop-by-hop), so nothing changes there.

It is applied at the ASGI edge (:class:`CloseForAxiosClients`), below the app, so every answer on
those routes obeys it: handlers' answers, errors and the request scope's own 5xx alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .wire import with_connection_close

CLOSE_PREFIXES = ("/files/", "/download/", "/upload", "/sessions/")
AXIOS_DEFAULT_ACCEPT = b"application/json, text/plain, */*"
_AGENT_PREFIXES = (b"librechat", b"axios/")


def looks_like_axios_caller(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True for LibreChat's requests and for axios with its default headers (see the module doc)."""
    for name, value in headers:
        if name == b"user-agent" and value.strip().lower().startswith(_AGENT_PREFIXES):
            return True
        if name == b"accept" and value.strip() == AXIOS_DEFAULT_ACCEPT:
            return True
    return False


def closes_connection(path: str, headers: Iterable[tuple[bytes, bytes]], *, clients: str = "librechat") -> bool:
    """Should the answer to this request close its connection? ``clients``: ``librechat`` (the rule
    above) or ``all`` (every client on the axios routes)."""
    if not path.startswith(CLOSE_PREFIXES):
        return False
    return clients == "all" or looks_like_axios_caller(headers)


class CloseForAxiosClients:
    """ASGI wrapper: ``Connection: close`` on the answers :func:`closes_connection` picks.

    Hypercorn closes the socket after such an answer (``api.scope`` keeps its bookkeeping from being
    cancelled half-way; ``tests/integration/api/test_wire.py`` checks it on the socket).
    """

    def __init__(self, app: Any, *, enabled: bool = True, clients: str = "librechat") -> None:
        self.app, self.enabled, self.clients = app, enabled, clients

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or not self.enabled
                or not closes_connection(scope.get("path", ""), scope.get("headers", ()), clients=self.clients)):
            await self.app(scope, receive, send)
            return

        async def closing_send(message: dict[str, Any]) -> None:
            await send(with_connection_close(message))

        await self.app(scope, receive, closing_send)
