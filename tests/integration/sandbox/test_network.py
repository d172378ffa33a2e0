"""No network by default: a TCP server the test runs on 127.0.0.1 is unreachable from the sandbox
(its own network namespace has only a loopback device); ``--sandbox-allow-network`` opens it."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from tests.support.sandbox import run, sandboxed
from tests.support.sidecar import wait_until

pytestmark = pytest.mark.integration

CONNECT = {
    "py": """import socket
try:
    s = socket.create_connection(('127.0.0.1', PORT), timeout=5)
    s.sendall(b'hello-from-sandbox')
    s.close()
    print('CONNECTED')
except OSError as e:
    print('failed', e.errno)
print('devices', sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]))
""",
    "bash": """if exec 3<>/dev/tcp/127.0.0.1/$PORT; then printf hello-from-sandbox >&3; exec 3>&-; echo CONNECTED
else echo failed; fi 2>/dev/null
""",
    "c": r"""#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>
int main(void) {
  struct sockaddr_in a; int s = socket(AF_INET, SOCK_STREAM, 0);
  memset(&a, 0, sizeof a); a.sin_family = AF_INET; a.sin_port = htons(PORT);
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
    write(s, "hello-from-sandbox", 18); close(s); printf("CONNECTED\n");
  } else printf("failed %d\n", errno);
  return 0;
}
""",
}


async def _with_listener(lang: str, *sidecar_args: str) -> tuple[dict, list[bytes]]:
    received: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                received.append(await stream.receive_some(100))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        code = {"py": f"PORT = {port}\n", "bash": f"PORT={port}\n", "c": f"#define PORT {port}\n"}[lang]
        async with sandboxed(lang, *sidecar_args) as (_sc, client):
            res = await run(client, code + CONNECT[lang])
            if "CONNECTED" in res["stdout"]:
                await wait_until(lambda: bool(received), 5)
        nursery.cancel_scope.cancel()
    return res, received


@pytest.mark.parametrize("lang", ["py", "bash", "c"])
async def test_no_connection_to_the_host_loopback(lang: str) -> None:
    res, received = await _with_listener(lang)
    assert res["exit_code"] == 0, res["stderr"]
    assert "CONNECTED" not in res["stdout"] and "failed" in res["stdout"]
    assert received == []
    if lang == "py":
        assert "devices ['lo']" in res["stdout"]


async def test_network_can_be_allowed() -> None:
    res, received = await _with_listener("py", "--sandbox-allow-network", "true")
    assert "CONNECTED" in res["stdout"], res
    assert received == [b"hello-from-sandbox"]
