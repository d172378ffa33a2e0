"""Bounds on what a request may hold before it is authenticated (audit finding 3).

Agents 3.1.70–3.1.79 send the API key only inside the JSON body of ``/exec``, so a request with no
key header must be read before it can be authenticated. Unbounded, that let anyone without a key
make the server buffer 4 MiB per socket (40 sockets: +250 MB RSS held for the 60 s body timeout).

Two bounds, both configurable:

* **per request** (``KCR_UNAUTH_BODY_BYTES``, 256 KiB): a body-key request may be at most this big.
  LibreChat's body-key ``/exec`` bodies are small (code, a few refs, the key); anything bigger must
  send the key in a header. Refused with 413 as soon as it is known (``Content-Length``) or reached.
* **globally** (``KCR_UNAUTH_BODY_BUDGET_BYTES``, 16 MiB): bytes held by all not-yet-authenticated
  bodies together. A request that would pass it is answered 503 + ``Retry-After`` at once.

Both answers close the connection, so the unread rest of the body is never buffered either.
"""

from __future__ import annotations

from kcr_trio.core.errors import ApiError, Unavailable


class UnauthBudget:
    """Bytes reserved by unauthenticated bodies, across all requests of this process."""

    def __init__(self, per_request: int, total: int) -> None:
        self.per_request = per_request
        self.total = total
        self.used = 0

    def too_large(self) -> ApiError:
        return ApiError(
            f"Request body too large for an unauthenticated request: at most {self.per_request} bytes "
            "before the API key is checked; send the key in the X-API-Key header",
            status=413,
            shape="A",
            headers={"Connection": "close"},
        )

    def reserve(self, held: int, more: int) -> None:
        """Account for ``more`` bytes on a body already holding ``held``; raise if over a bound."""
        if held + more > self.per_request:
            raise self.too_large()
        if self.used + more > self.total:
            exc = Unavailable("Too many unauthenticated requests in progress; retry shortly", retry_after=1)
            exc.headers["Connection"] = "close"
            raise exc
        self.used += more

    def release(self, amount: int) -> None:
        self.used = max(0, self.used - amount)
