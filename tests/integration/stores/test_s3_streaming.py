"""Objects stream through kcr-trio: a 64 MiB upload and download never make this process hold the
file. Resident memory is sampled while the transfer runs; a buffered copy would add 64 MiB+."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import trio

from kcr_trio.backends.s3_files import S3FileStore

SIZE = 64 * 1024 * 1024
PIECE = 256 * 1024
LIMIT = 24 * 1024 * 1024  # allowed growth of resident memory during a transfer


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def peak_growth(work) -> int:
    base = rss()
    peak = base
    done = trio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        try:
            await work()
        finally:
            done.set()
    return peak - base


async def test_large_object_streams_both_ways(s3_store: S3FileStore, s3_server) -> None:
    piece = os.urandom(PIECE)
    expected = hashlib.sha256()
    for _ in range(SIZE // PIECE):
        expected.update(piece)
    key = "sessions/stream/uploads/big"

    async def source() -> AsyncIterator[bytes]:
        for _ in range(SIZE // PIECE):
            yield piece

    async def upload() -> None:
        assert await s3_store.put(key, source(), content_type="application/octet-stream") == SIZE

    growth_up = await peak_growth(upload)
    head = s3_server.client().head_object(Bucket=s3_store.bucket, Key=key)
    assert head["ContentLength"] == SIZE

    got = hashlib.sha256()
    received = 0

    async def download() -> None:
        nonlocal received
        async with s3_store.open(key) as body:
            async for chunk in body:
                got.update(chunk)
                received += len(chunk)

    growth_down = await peak_growth(download)
    print(f"\n64 MiB: RSS growth upload {growth_up / 2**20:.1f} MiB, download {growth_down / 2**20:.1f} MiB")
    assert received == SIZE and got.digest() == expected.digest()
    assert growth_up < LIMIT, growth_up
    assert growth_down < LIMIT, growth_down
    assert s3_store.pool_stats()["in_use"] == 0
