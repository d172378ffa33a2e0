"""``slow-clients``: /exec latency while many idle keep-alive connections and slow body senders load
the server.

Per run: ``--idle-connections`` sockets each make one ``GET /health`` and then sit idle (kept
alive); ``--slow-senders`` sockets each start a ``POST /exec`` whose body trickles one byte every
``--slow-interval`` s. Meanwhile one client measures ``print('hi')`` latency for ``--duration``
seconds. Also reported: how many idle sockets the server closed during the window (its idle
timeout at work) and how many slow senders it answered before the window ended (e.g. 408).
"""

from __future__ import annotations

import trio

from kcr_trio.bench.client import HELLO, client, timed_exec
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.rawhttp import open_stream, read_full_response, request_head
from kcr_trio.bench.stats import percentile
from kcr_trio.bench.targets import Target


class SlowClients:
    name = "slow-clients"
    title = "/exec latency under idle keep-alive connections and slow body senders"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return [f"{opts.idle_connections} idle + {opts.slow_senders} slow"]

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        opts, res = ctx.opts, StepResult()
        counts = {"idle opened": 0, "idle closed by server": 0, "slow answered": 0, "load errors": 0}
        window_open = trio.Event()
        window_over = trio.Event()

        async def connect() -> trio.abc.Stream | None:
            """A connection to the target, or None (counted as a load error)."""
            try:
                return await open_stream(target)
            except (OSError, trio.TooSlowError):
                counts["load errors"] += 1
                return None

        async def idle() -> None:
            stream = await connect()
            if stream is None:
                return
            async with stream:
                try:
                    await stream.send_all(request_head(target, "GET", "/health"))
                    await read_full_response(stream)
                    counts["idle opened"] += 1
                    with trio.move_on_after(opts.duration + 60):
                        await window_open.wait()
                        # Idle now; any byte or EOF before the window ends means the server closed it.
                        with trio.move_on_after(opts.duration + 1):
                            async with trio.open_nursery() as n:
                                async def over() -> None:
                                    await window_over.wait()
                                    n.cancel_scope.cancel()
                                n.start_soon(over)
                                await stream.receive_some(1)
                                counts["idle closed by server"] += 1
                                n.cancel_scope.cancel()
                except (OSError, EOFError, ValueError, trio.BrokenResourceError):
                    counts["idle closed by server"] += 1

        async def slow() -> None:
            body = b'{"code": "print(1)", "lang": "py"}'
            stream = await connect()
            if stream is None:
                return
            async with stream:
                try:
                    await stream.send_all(request_head(target, "POST", "/exec", length=len(body),
                                                       content_type="application/json"))
                    async with trio.open_nursery() as n:
                        async def answered() -> None:
                            data = await stream.receive_some(1)
                            if data:
                                counts["slow answered"] += 1
                            n.cancel_scope.cancel()
                        n.start_soon(answered)
                        with trio.move_on_after(opts.duration + 60):
                            for i in range(len(body) - 1):  # never the last byte: stays incomplete
                                if window_over.is_set():
                                    break
                                await stream.send_all(body[i:i + 1])
                                with trio.move_on_after(opts.slow_interval):
                                    await window_over.wait()
                        n.cancel_scope.cancel()
                except (OSError, trio.BrokenResourceError):
                    pass

        lat: list[float] = []
        errors = 0
        body = {"code": HELLO["py"], "lang": "py"}
        async with client(target, timeout=opts.timeout, connections=1) as c:
            await timed_exec(c, body, "hi")  # warm the measuring connection
            async with trio.open_nursery() as nursery:
                for _ in range(opts.idle_connections):
                    nursery.start_soon(idle)
                for _ in range(opts.slow_senders):
                    nursery.start_soon(slow)
                with trio.move_on_after(10):  # ramp-up: until every idle socket has had its answer
                    while counts["idle opened"] + counts["load errors"] < opts.idle_connections:
                        await trio.sleep(0.01)
                window_open.set()
                end = trio.current_time() + opts.duration
                with trio.move_on_after(opts.duration + opts.timeout):
                    for _ in range(opts.max_requests_per_window):
                        if trio.current_time() >= end:
                            break
                        out = await timed_exec(c, body, "hi")
                        if out.ok:
                            lat.append(out.ms)
                        else:
                            errors += 1
                            res.error(out.error or "error")
                window_over.set()
        res.samples["latency ms"] = lat
        res.figures.update({"p50 ms": percentile(lat, 50), "p95 ms": percentile(lat, 95),
                            "p99 ms": percentile(lat, 99), "errors": errors, "ok": len(lat), **counts})
        return res
