"""A small Trio-native Redis client (RESP2 over plain TCP) for the session store's hot reads.

Why: ``GET /files/{sid}`` is one Lua script call, and through redis-py on the trio-asyncio bridge
that call cost ~275 µs of CPU (an asyncio task, the bridge's hand-offs both ways, redis-py's
connection and parser layers), against ~35 µs for the same command written and read on a Trio
socket (measured in one process against one redis-server). The design's rule is Trio-native
libraries first; no maintained Trio Redis client exists, and the store's hot reads need only a
tiny part of the protocol: one command, one reply.

Scope, deliberately narrow: standalone Redis over plain TCP (``redis://``, optional user/password,
db). TLS, sentinel and cluster keep redis-py (``backends/redis_client.py``), and so does everything
that is not a hot read (multi-command writes, scans, the PTC store). ``RedisSessionStore`` uses
this client only where it was built (:func:`native_target`) and otherwise runs exactly as before.
Two clients means two pools, each bounded by ``REDIS_MAX_CONNECTIONS``: a replica may hold up to
twice that many connections to a standalone Redis (in practice the redis-py pool stays small:
writes and cleanup are a small share of the traffic). ``KCR_REDIS_NATIVE=false`` keeps one pool.

Behaviour matches what the store promises with redis-py:

* **Bounded pool.** At most ``max_connections`` connections; a caller waits for one at most
  ``pool_timeout`` seconds, then fails as "cannot connect" (redis-py's blocking pool does the same).
* **Timeouts.** Connect within ``connect_timeout``; each reply within ``socket_timeout``
  (:class:`RespTimeout`); the store's operation deadline wraps the whole call.
* **Retries.** A connection that fails or times out is dropped and the command retried twice on a
  fresh one after a short back-off (20 ms, 40 ms), as the redis-py client is configured; the hot
  reads are idempotent (the touch script writes the same ``last_activity`` again).
* **Cancellation.** A caller cancelled between sending a command and reading its whole reply
  drops that connection (its reply would otherwise be read by the next user); otherwise the
  connection goes back to the pool. Nothing is left in use.
* **Errors.** Error replies raise :class:`RespError` (``-NOSCRIPT`` is handled: the script is sent
  with ``EVAL`` once, which also caches it); failures to reach Redis raise :class:`RespConnectionError`
  or :class:`RespTimeout`. ``redis_client.translate`` maps all of them to the same
  ``Session store unavailable: ...`` reasons as redis-py's exceptions.
* **Replies** decode as redis-py's ``decode_responses=True`` does (UTF-8 strings, ints, lists).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import trio

__all__ = ["NativeTarget", "RespConnectionError", "RespError", "RespPool", "RespTimeout", "native_target"]

_READ = 64 * 1024
_RETRIES = 2
_BACKOFF = 0.02


class RespError(Exception):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``); the connection stays usable."""


class RespAuthError(RespError):
    """``AUTH`` was refused (wrong password or user)."""


class RespConnectionError(ConnectionError):
    """Redis could not be reached, or closed the connection."""


class RespTimeout(TimeoutError):
    """No connection or no reply within the socket timeouts."""


@dataclass(frozen=True)
class NativeTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    db: int


def native_target(url: str, *, tls: bool) -> NativeTarget | None:
    """Where the native client connects for a standalone ``url``, or ``None`` where it does not
    apply (TLS, Unix sockets, URL options it does not implement): redis-py serves those."""
    parsed = urlparse(url)
    if tls or parsed.scheme != "redis" or parsed.query or not parsed.hostname:
        return None
    path = parsed.path.strip("/")
    if path and not path.isdigit():
        return None
    return NativeTarget(parsed.hostname, parsed.port or 6379, unquote(parsed.username) if parsed.username else None,
                        unquote(parsed.password) if parsed.password else None, int(path or 0))


def encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    """The buffer ends before the reply does (``_Connection.reply`` then reads it as it arrives)."""


def parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int] | None:
    """One RESP2 reply from ``buf[pos:]`` and the position after it, or None if it is not all there
    yet. Bulk strings are decoded as UTF-8 (the store keeps text only), an error reply is a
    ``RespError`` value, a null bulk or array is None."""
    try:
        return _value(buf, pos)
    except _Incomplete:
        return None


def _value(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # "$" bulk string
        size = int(buf[pos + 1:end])
        if size < 0:
            return None, end + 2
        start = end + 2
        if len(buf) < start + size + 2:
            raise _Incomplete
        return bytes(buf[start:start + size]).decode(), start + size + 2
    if kind == 42:  # "*" array
        count = int(buf[pos + 1:end])
        if count < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(count):
            item, pos = _value(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # ":" integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:  # "+" simple string
        return bytes(buf[pos + 1:end]).decode(), end + 2
    if kind == 45:  # "-" error
        return RespError(bytes(buf[pos + 1:end]).decode(errors="replace")), end + 2
    raise RespConnectionError(f"protocol error: unexpected reply type {bytes(buf[pos:pos + 1])!r}")


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.pos = 0

    async def _fill(self) -> None:
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        try:
            data = await self.stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise RespConnectionError(f"connection lost: {exc}") from exc
        if not data:
            raise RespConnectionError("Redis closed the connection")
        self.buf += data

    async def reply(self) -> Any:
        """One whole reply; an error reply is returned as a ``RespError`` (not raised) so that the
        elements of an array after it are still read.

        A reply that one ``receive_some`` brings whole (every short reply) is parsed by the plain
        function :func:`parse`: a ``/files`` listing is an array of arrays, and a coroutine per
        element cost more than the parse itself. A longer one is read element by element as it
        arrives (:meth:`_streamed`), so a large reply is never parsed again from its start."""
        if self.pos == len(self.buf):
            await self._fill()
        parsed = parse(self.buf, self.pos)
        if parsed is not None:
            value, self.pos = parsed
            return value
        return await self._streamed()

    async def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos:end])
                self.pos = end + 2
                return line
            await self._fill()

    async def _bulk(self, size: int) -> bytes:
        while len(self.buf) - self.pos < size + 2:
            await self._fill()
        data = bytes(self.buf[self.pos:self.pos + size])
        self.pos += size + 2
        return data

    async def _streamed(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self._bulk(size)).decode()
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [await self._streamed() for _ in range(count)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        raise RespConnectionError(f"protocol error: unexpected reply type {kind!r}")

    async def call(self, args: Sequence[str | bytes | int]) -> Any:
        try:
            await self.stream.send_all(encode(args))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise RespConnectionError(f"connection lost: {exc}") from exc
        return await self.reply()


class RespPool:
    """A bounded pool of native connections to one standalone Redis (see the module docstring)."""

    def __init__(self, target: NativeTarget, *, max_connections: int, pool_timeout: float,
                 socket_timeout: float, connect_timeout: float) -> None:
        self.target = target
        self.pool_timeout = pool_timeout
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._slots = trio.CapacityLimiter(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False

    def stats(self) -> dict[str, int]:
        return {"in_use": int(self._slots.borrowed_tokens), "idle": len(self._idle),
                "max": int(self._slots.total_tokens)}

    async def execute(self, *args: str | bytes | int) -> Any:
        """One command's reply; ``RespError`` for an error reply."""
        reply = await self._run(args)
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run a Lua script by its SHA-1, loading it with ``EVAL`` if the server does not know it."""
        tail = [len(keys), *keys, *args]
        try:
            return await self.execute("EVALSHA", script.sha, *tail)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script.source, *tail)

    async def aclose(self) -> None:
        self._closed = True
        await self._drop_idle()

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    # -- plumbing ---------------------------------------------------------------------------------

    async def _run(self, args: Sequence[str | bytes | int]) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller takes no connection
        try:  # a free slot is the common case: take it without a timed wait's cancel scope
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.pool_timeout) as waiting:
                await self._slots.acquire()
            if waiting.cancelled_caught:
                raise RespConnectionError("no connection available within the pool timeout") from None
        try:
            for attempt in range(_RETRIES + 1):
                try:
                    return await self._once(args)
                except (RespConnectionError, RespTimeout):
                    # After a Redis restart every idle connection is dead: retry on a new one.
                    await self._drop_idle()
                    if attempt == _RETRIES:
                        raise
                await trio.sleep(_BACKOFF * 2**attempt)
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

    async def _once(self, args: Sequence[str | bytes | int]) -> Any:
        conn = self._idle.pop() if self._idle else await self._connect()
        done = False
        try:
            with trio.move_on_after(self.socket_timeout) as timer:
                reply = await conn.call(args)
                done = True
            if timer.cancelled_caught:
                raise RespTimeout("Redis did not answer within the socket timeout")
            return reply
        finally:
            if done and not self._closed:
                self._idle.append(conn)
            else:  # failed, timed out or cancelled half-way: its next reply is not ours to read
                await trio.aclose_forcefully(conn.stream)

    async def _connect(self) -> _Connection:
        target = self.target
        with trio.move_on_after(self.connect_timeout) as timer:
            try:
                stream = await trio.open_tcp_stream(target.host, target.port)
            except OSError as exc:
                raise RespConnectionError(f"cannot connect: {exc}") from exc
        if timer.cancelled_caught:
            raise RespTimeout("no connection to Redis within the connect timeout")
        conn = _Connection(stream)
        try:
            with trio.move_on_after(self.socket_timeout) as timer:
                if target.password is not None:
                    auth = ("AUTH", target.username, target.password) if target.username else ("AUTH", target.password)
                    reply = await conn.call(auth)
                    if isinstance(reply, RespError):
                        raise RespAuthError(str(reply))
                if target.db:
                    reply = await conn.call(("SELECT", target.db))
                    if isinstance(reply, RespError):
                        raise reply
            if timer.cancelled_caught:
                raise RespTimeout("Redis did not answer the connection set-up in time")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return conn


@dataclass(frozen=True)
class Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())
