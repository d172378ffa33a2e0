"""The S3 store's own PUT (``s3_put.FilePut``: SigV4 on Trio sockets, the file sent with
``sendfile``) against a real S3 server (moto), seen through a TCP relay in between that counts
connections, can close them, hold the body half-way, or withhold S3's answer.

What must hold: bytes land intact; connections are kept and reused; a kept connection the server
closed is replaced without failing the upload; a cancelled or stalled PUT leaves no object and no
connection behind; S3's refusals become 503s with a client-safe reason.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from kcr_trio.backends.s3_files import S3FileStore, open_s3_files
from kcr_trio.config import Settings
from kcr_trio.core.errors import Unavailable
from kcr_trio.core.interfaces import Spooled
from tests.support.s3_server import S3Server, unique_bucket


class Relay:
    """Forwards TCP connections to ``target``; each direction is pumped by its own task."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self.upstream_bytes = 0  # client -> S3
        self.hold_after: int | None = None  # stop forwarding the body after this many bytes
        self.held = trio.Event()
        self.withhold_answers = False  # S3's answers are read but never passed on
        self._scopes: list[trio.CancelScope] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def drop_all(self) -> None:
        """Close every relayed connection (like a server dropping its idle keep-alive sockets)."""
        for scope in self._scopes:
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, True, nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, False, nursery.cancel_scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, up: bool, done: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(256 * 1024):
                if up:
                    self.upstream_bytes += len(data)
                    if self.hold_after is not None and self.upstream_bytes >= self.hold_after:
                        self.held.set()
                        await trio.sleep_forever()  # hold the rest of the body (until cancelled)
                elif self.withhold_answers:
                    continue
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self.withhold_answers and not up:
            await trio.sleep_forever()  # S3 closed after its (withheld) answer: keep the client waiting
        done.cancel()


@pytest.fixture
async def relay(s3_server: S3Server) -> AsyncIterator[Relay]:
    relay = Relay(s3_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        yield relay
        nursery.cancel_scope.cancel()


def settings_via(relay: Relay, s3_server: S3Server, bucket: str, **overrides: object) -> object:
    return s3_server.settings(bucket, minio_endpoint=f"127.0.0.1:{relay.port}", **overrides)


def spool(tmp_path: Path, data: bytes, *, digest: bool = True) -> Spooled:
    path = tmp_path / f"spool-{hashlib.sha256(data).hexdigest()[:8]}"
    path.write_bytes(data)
    return Spooled(path, len(data), hashlib.sha256(data).hexdigest() if digest else None)


def stored(s3_server: S3Server, bucket: str, key: str) -> bytes:
    return bytes(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())


class KeepAliveS3:
    """A minimal HTTP/1.1 server (h11) that answers every request 200 and keeps the connection.
    moto closes its connection after every answer, so reuse (and replacing a kept connection the
    server closed) can only be seen against a server that keeps them, as MinIO and S3 do. It
    records, per PUT, whether the signed payload digest equals the SHA-256 of the body received."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.puts: list[tuple[str, bool]] = []
        self._streams: list[trio.SocketStream] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def close_connections(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self._streams.append(stream)
        conn = h11.Connection(h11.SERVER)
        target, headers, body = b"", {}, hashlib.sha256()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(256 * 1024))
                elif isinstance(event, h11.Request):
                    target, headers, body = event.target, dict(event.headers), hashlib.sha256()
                elif isinstance(event, h11.Data):
                    body.update(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    if target.startswith(b"/kept/sessions/"):
                        self.puts.append((target.decode(), headers[b"x-amz-content-sha256"].decode() == body.hexdigest()))
                    answer = h11.Response(status_code=200, headers=[("content-length", "0")])
                    await stream.send_all(conn.send(answer) + (conn.send(h11.EndOfMessage()) or b""))
                    conn.start_next_cycle()
                else:
                    return  # the client closed
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return


@pytest.fixture
async def keepalive_s3() -> AsyncIterator[KeepAliveS3]:
    server = KeepAliveS3()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


async def test_uploads_share_one_kept_connection(bridge, s3_server: S3Server, keepalive_s3: KeepAliveS3,
                                                 tmp_path: Path) -> None:
    s3 = s3_server.settings("kept", minio_endpoint=f"127.0.0.1:{keepalive_s3.port}")
    async with open_s3_files(Settings(), s3) as store:  # type: ignore[arg-type]
        await store.put("sessions/s/uploads/f0", spool(tmp_path, b"0"), content_type="x/y")
        accepted = keepalive_s3.accepted
        for i, size in enumerate((300_000, 3_000_000), start=1):
            await store.put(f"sessions/s/uploads/f{i}", spool(tmp_path, os.urandom(size), digest=i != 1),
                            content_type="x/y")
            assert store.pool_stats()["put_idle"] == 1
        assert keepalive_s3.accepted == accepted
        assert store.pool_stats()["in_use"] == 0
    assert keepalive_s3.puts == [(f"/kept/sessions/s/uploads/f{i}", True) for i in range(3)]


async def test_a_kept_connection_the_server_closed_is_replaced(bridge, s3_server: S3Server,
                                                               keepalive_s3: KeepAliveS3, tmp_path: Path) -> None:
    s3 = s3_server.settings("kept", minio_endpoint=f"127.0.0.1:{keepalive_s3.port}")
    async with open_s3_files(Settings(), s3) as store:  # type: ignore[arg-type]
        await store.put("sessions/s/uploads/a", spool(tmp_path, b"first"), content_type="text/plain")
        accepted = keepalive_s3.accepted
        await keepalive_s3.close_connections()
        await store.put("sessions/s/uploads/b", spool(tmp_path, b"second" * 50_000), content_type="text/plain")
        assert keepalive_s3.accepted == accepted + 1
    assert keepalive_s3.puts == [("/kept/sessions/s/uploads/a", True), ("/kept/sessions/s/uploads/b", True)]


async def test_bytes_land_intact(bridge, s3_server: S3Server, tmp_path: Path) -> None:
    bucket = unique_bucket()
    blobs = [b"", os.urandom(1), os.urandom(5_000_000)]
    # A part's Content-Type may hold anything a client wrote; the object's header stays plain ASCII.
    types = ["x/y", "text/plain; name=\u00fc", "text/plain\x7f"]
    async with open_s3_files(Settings(), s3_server.settings(bucket)) as store:  # type: ignore[arg-type]
        for i, data in enumerate(blobs):
            assert await store.put(f"sessions/s/uploads/f{i}", spool(tmp_path, data), content_type=types[i]) == len(data)
        assert store.pool_stats()["in_use"] == 0
    for i, data in enumerate(blobs):
        assert stored(s3_server, bucket, f"sessions/s/uploads/f{i}") == data


async def test_cancelled_put_leaves_no_object_and_no_connection(bridge, s3_server: S3Server, relay: Relay,
                                                                tmp_path: Path) -> None:
    bucket = unique_bucket()
    async with open_s3_files(Settings(), settings_via(relay, s3_server, bucket)) as store:  # type: ignore[arg-type]
        relay.hold_after = relay.upstream_bytes + 2 * 1024 * 1024
        big = spool(tmp_path, os.urandom(24 * 1024 * 1024))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(store.put, "sessions/s/uploads/big", big, content_type="x/y"))
            await relay.held.wait()  # the body is half-way through
            nursery.cancel_scope.cancel()
        assert store.pool_stats()["in_use"] == 0 and store.pool_stats()["put_idle"] == 0
        relay.hold_after = None
        await store.put("sessions/s/uploads/after", spool(tmp_path, b"still works"), content_type="text/plain")
    assert s3_server.list_keys(bucket) == ["sessions/s/uploads/after"]


async def test_s3_that_never_answers_is_a_503(bridge, s3_server: S3Server, relay: Relay, tmp_path: Path) -> None:
    bucket = unique_bucket()
    s3 = settings_via(relay, s3_server, bucket, kcr_s3_read_timeout=1.0)
    async with open_s3_files(Settings(), s3) as store:  # type: ignore[arg-type]
        relay.withhold_answers = True
        with pytest.raises(Unavailable) as info:
            await _put_without_cleanup(store, "sessions/s/uploads/slow", spool(tmp_path, b"x" * 100_000))
        assert info.value.message == "File store unavailable: S3 timed out"
        assert store.pool_stats()["in_use"] == 0 and store.pool_stats()["put_idle"] == 0


async def _put_without_cleanup(store: S3FileStore, key: str, body: Spooled) -> None:
    """The PUT alone (``put`` would also try to delete the object, through the same silent relay)."""
    handle = open(body.path, "rb")  # noqa: SIM115 - closed below
    try:
        assert body.sha256 is not None
        await store._put_file(key, handle, body.size, "x/y", body.sha256, timeout=30)
    finally:
        handle.close()


async def test_s3_refusals_are_503s_with_a_reason(bridge, s3_server: S3Server, tmp_path: Path) -> None:
    bucket = unique_bucket()
    async with open_s3_files(Settings(), s3_server.settings(bucket, kcr_minio_create_bucket=False)) as store:  # type: ignore[arg-type]
        with pytest.raises(Unavailable) as info:
            await store.put("sessions/s/uploads/a", spool(tmp_path, b"data"), content_type="text/plain")
        assert info.value.message == f"File store unavailable: bucket {bucket} does not exist"
        assert store.pool_stats()["in_use"] == 0


async def test_a_vanished_bucket_is_created_again(bridge, s3_server: S3Server, tmp_path: Path) -> None:
    bucket = unique_bucket()
    async with open_s3_files(Settings(), s3_server.settings(bucket)) as store:  # type: ignore[arg-type]
        await store.put("sessions/s/uploads/a", spool(tmp_path, b"one"), content_type="text/plain")
        client = s3_server.client()
        client.delete_object(Bucket=bucket, Key="sessions/s/uploads/a")
        client.delete_bucket(Bucket=bucket)
        await store.put("sessions/s/uploads/b", spool(tmp_path, b"two"), content_type="text/plain")
    assert stored(s3_server, bucket, "sessions/s/uploads/b") == b"two"
