"""Side-by-side HTTP-cost benchmark: kcr-trio and a KubeCodeRun-shaped peer on one redis-server and one S3.

    python3 scripts/bench_http.py [--kcr NAME=SOURCE_DIR ...] [--no-peer] -- [kcr-trio bench options]

Starts a real ``redis-server`` and a moto S3 server, one ``kcr-trio serve`` per ``--kcr`` (default:
this checkout as ``kcr``; give several to compare two source trees, e.g. before and after a change,
in one interleaved run) and the FastAPI/uvicorn peer (``tests/support/http_peer.py``, needs the
``bench-peer`` extra) as ``peer``, then runs ``kcr-trio bench --scenario http-cost`` against all of
them. Everything it started is stopped on exit. Run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.redis_server import free_port, running_redis  # noqa: E402
from tests.support.s3_server import running_s3  # noqa: E402
from tests.support.server import TEST_KEY, server_process  # noqa: E402

# No warm sandboxes: these routes never execute code, and idle sidecars would only add noise.
KCR_ENV = {"POD_POOL_PY": "0", "POD_POOL_JS": "0", "POD_POOL_BASH": "0", "KCR_SESSION_STORE": "redis",
           "KCR_FILE_STORE": "s3"}


@contextlib.contextmanager
def peer_process(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    # Its log lines go to a pipe drained by a thread here, as kcr-trio's do (tests.support.server).
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.http_peer", "--port", str(port)],
                            env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    drain = threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True)
    drain.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"peer exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("peer did not answer /health within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kcr", action="append", default=[], metavar="NAME=SOURCE_DIR",
                        help="a kcr-trio source tree to serve (repeat; default: this checkout as 'kcr')")
    parser.add_argument("--no-peer", action="store_true", help="only the kcr-trio targets")
    parser.add_argument("--kcr-env", action="append", default=[], metavar="VAR=VALUE",
                        help="extra environment for every kcr-trio server")
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    trees = [tuple(spec.split("=", 1)) for spec in args.kcr] or [("kcr", str(ROOT))]
    extra = dict(item.split("=", 1) for item in args.kcr_env)
    from kcr_trio.bench.cli import main as bench_main

    with running_redis() as redis, running_s3() as s3, contextlib.ExitStack() as stack:
        targets: list[str] = []
        for name, tree in trees:
            env = {**KCR_ENV, **redis.env(prefix=f"{name}:"), **s3.env(bucket=f"bench-{name}".lower()),
                   **extra, "PYTHONPATH": tree, "LOG_LEVEL": "INFO"}
            with contextlib.chdir(tree):  # `python -m` puts the working directory first on sys.path
                server = stack.enter_context(server_process(env))
            targets += ["--target", f"{name}={server.url},{TEST_KEY}"]
        if not args.no_peer:
            peer_env = {"REDIS_URL": redis.url, "MINIO_ENDPOINT": s3.endpoint, **dict(
                (k, v) for k, v in s3.env(bucket="bench-peer").items() if k.startswith("MINIO_")),
                "API_KEY": TEST_KEY}
            url = stack.enter_context(peer_process(peer_env))
            targets += ["--target", f"peer={url},{TEST_KEY}"]
        return bench_main([*targets, "--scenario", "http-cost", *rest])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
