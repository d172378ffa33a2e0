"""Start-up: working directory, listening socket, HTTP server (``httpd.py``), pre-warm, shutdown.

The listening socket is either inherited (``--fd N``: the parent bound it, so a client may connect
before we even start; connections wait in the kernel's backlog, which is what makes a local pool
race-free) or bound here. With ``--announce`` one JSON line ``{"event": "ready", "port", "pid"}``
goes to stdout once requests are served and the pre-warmed interpreter (if any) is up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import tempfile
from functools import partial

import trio

from . import proctree
from .app import App
from .config import Config
from .httpd import Server
from .languages import Toolchain, lookup
from .limits import reachable_by, resolve_identity
from .prewarm import remove_tree
from .runner import Runner, log
from .sandbox import SandboxError, for_sidecar


def prepare_working_dir(cfg: Config, uid: int | None, gid: int | None) -> None:
    os.makedirs(cfg.working_dir, exist_ok=True)
    if uid is not None:
        os.chown(cfg.working_dir, uid, gid)  # type: ignore[arg-type]
        os.chmod(cfg.working_dir, 0o700)  # the run uid's alone (we are root and need no bits)


def own_tmp_root(base: str) -> str:
    """A directory of this sidecar's own below ``base`` for per-run temp dirs.

    A sidecar killed with SIGKILL cannot clean up; the next one started on the same ``base``
    removes directories whose sidecar (the pid in the name) is gone. In a pod ``/tmp`` is an
    emptyDir and dies with it anyway.
    """
    os.makedirs(base, exist_ok=True)
    for name in os.listdir(base):
        m = re.fullmatch(r"kcr-sidecar-(\d+)-\w+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            remove_tree(os.path.join(base, name))
    path = tempfile.mkdtemp(prefix=f"kcr-sidecar-{os.getpid()}-", dir=base)
    os.chmod(path, 0o711)  # run uids reach their own 0700 dirs inside, but cannot list
    return path


def listening_socket(cfg: Config) -> socket.socket:
    if cfg.fd is not None:
        sock = socket.socket(fileno=cfg.fd)
    else:
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
        sock.listen(128)
    sock.set_inheritable(False)
    return sock


async def watch_lifeline(fd: int, stop: trio.Event) -> None:
    """Shut down once the parent is gone: ``fd`` is the read end of a pipe whose write end only
    the parent holds, so it reaches EOF when the parent exits however it exits (SIGKILL included).

    Why not a parent-death signal: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked us
    exits, and the executor starts sidecars from Trio worker threads, which retire after 10 s idle.
    The shutdown then runs the normal path: the HTTP server stops, the runner kills every process
    of its runs (tree and uid sweep), and bubblewrap's ``--die-with-parent`` ends the sandboxes."""
    os.set_blocking(fd, False)
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                if not os.read(fd, 4096):
                    break  # EOF: every write end is closed
            except BlockingIOError:
                continue
            except OSError:
                break
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    log("parent_gone", pid=os.getpid())
    stop.set()


async def run(cfg: Config) -> None:
    spec = lookup(cfg.language)
    if spec is None:
        raise SystemExit(f"sidecar: unsupported language {cfg.language!r}")
    identity = resolve_identity(cfg.run_uid, cfg.run_gid, cfg.run_uid_exclusive)
    prepare_working_dir(cfg, identity.uid, identity.gid)
    cfg.tmp_root = own_tmp_root(cfg.tmp_root)
    cfg.working_dir = os.path.abspath(cfg.working_dir)
    if identity.switching and not reachable_by(cfg.working_dir, identity.uid, identity.gid):  # type: ignore[arg-type]
        log("working_dir_unreachable", working_dir=cfg.working_dir, uid=identity.uid,
            hint="a parent directory is not traversable by the run uid; interpreters that open "
                 "their script by absolute path (python, php) will fail")
    subreaper = proctree.become_subreaper()
    try:  # probe bubblewrap once, as the run uid, before anything is served
        sandbox, warning = await trio.to_thread.run_sync(partial(
            for_sidecar, cfg.sandbox, cfg.working_dir, allow_network=cfg.sandbox_allow_network,
            ro_paths=cfg.sandbox_ro_paths, language=spec.code, python=Toolchain(cfg.python).python,
            node_path=cfg.node_path, uid=identity.uid, gid=identity.gid, tmp_root=cfg.tmp_root,
            bwrap=cfg.sandbox_bwrap or None, etc_view=cfg.sandbox_etc_view or None))
    except SandboxError as exc:
        log("sandbox_unavailable", error=str(exc))
        remove_tree(cfg.tmp_root)
        raise SystemExit(f"sidecar: {exc}") from None
    if warning:
        log("sandbox_unavailable", warning=warning)
    sock = listening_socket(cfg)
    port = sock.getsockname()[1]
    runner = Runner(cfg, spec, identity)
    runner.sandbox = sandbox
    http = Server(App(cfg, runner), keep_alive_timeout=75, graceful_timeout=1, max_head_size=64 * 1024,
                  log=log)
    stop = trio.Event()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        if cfg.lifeline_fd is not None:
            nursery.start_soon(watch_lifeline, cfg.lifeline_fd, stop)
        await nursery.start(runner.serve)
        server_done = trio.Event()

        async def http_server(task_status: trio.TaskStatus[None]) -> None:
            try:
                await http.serve(sock, stop, task_status=task_status)
            finally:
                server_done.set()

        await nursery.start(http_server)
        if runner.warm is not None:
            with trio.move_on_after(30):
                await runner.warm.ready.wait()
        log("sidecar_started", language=spec.code, port=port, pid=os.getpid(), working_dir=cfg.working_dir,
            uid=identity.uid, prewarm=runner.prewarm_enabled, subreaper=subreaper,
            sandbox="bwrap" if sandbox is not None else "none")
        if cfg.announce:
            sys.stdout.write(json.dumps({"event": "ready", "port": port, "pid": os.getpid()}) + "\n")
            sys.stdout.flush()
        await server_done.wait()  # SIGTERM/SIGINT -> graceful HTTP shutdown -> stop everything
        nursery.cancel_scope.cancel()
    remove_tree(cfg.tmp_root)


def main(cfg: Config) -> int:
    try:
        trio.run(run, cfg)
    except KeyboardInterrupt:
        return 130
    return 0
