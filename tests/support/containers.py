"""Podman for the tests: the flags this host needs, image builds, and containers without a network
that the host still reaches on one loopback port.

Containers run with ``--network none``: inside there is only a loopback interface, as in a pod
whose NetworkPolicy denies everything. The test (or the emulated kubelet) reaches the one port it
needs through :class:`NetnsForwarder`, which listens on a host loopback address and opens each
upstream connection *inside the container's network namespace* (``setns`` on a helper thread), so
no route, bridge or published port exists that user code could use to get out.

Standard library only: :mod:`tests.support.container_pod` runs this as a separate process under
the Kubernetes emulator's ``pod_init``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import socket
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"

# crun refuses this host kind's hybrid cgroup layout, and podman's default ulimits exceed the hard
# limits of a container host (platform-notes.md); both are overridable like in build-images.sh.
PODMAN = ["podman", *shlex.split(os.environ.get("PODMAN_FLAGS", "--runtime runc --cgroup-manager=cgroupfs"))]
ULIMITS = shlex.split(os.environ.get("ULIMIT_FLAGS", "--ulimit nofile=4096:4096 --ulimit nproc=4096:4096"))

REGISTRY = "ghcr.io/kcr-trio"
LOCAL_BASE = "localhost/kcr-trio-base:bookworm"
CLONE_NEWNET = 0x40000000


def chart_app_version() -> str:
    for line in (ROOT / "charts" / "kcr-trio" / "Chart.yaml").read_text().splitlines():
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise RuntimeError("no appVersion in Chart.yaml")


TAG = chart_app_version()
API_IMAGE = f"{REGISTRY}/kcr-trio:{TAG}"


def sidecar_image(suffix: str) -> str:
    """The name build-images.sh gives a language image (``python``, ``javascript``, ``c-cpp``...)."""
    return f"{REGISTRY}/kcr-trio-sidecar-{suffix}:{TAG}"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=check)


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why podman cannot build and run containers on this machine, or ``None`` if it can.

    Only missing tools or a podman that cannot start at all count; a build or run that fails
    once podman works is a test failure, not a skip."""
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs podman, runc and mmdebstrap)"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "`podman info` did not answer within 60 s"
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[:300]}"
    return None


def build_images(*targets: str, timeout: float = 1800) -> str:
    """Run scripts/build-images.sh for ``targets`` (idempotent: podman's layer cache makes an
    unchanged image a few seconds' work). Returns its output; raises with the log on failure."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), *targets], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"build-images.sh {' '.join(targets)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


# --------------------------------------------------------------------------------------------
# reaching a port inside a container that has no network


_libc = ctypes.CDLL(None, use_errno=True)


def _enter_netns(fd: int) -> None:
    """Move the *calling thread* into the network namespace ``fd`` (namespaces are per thread)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on: the sidecar sees a disconnect
        except OSError:
            pass


class NetnsForwarder:
    """Listen on ``(host, port)`` in our namespace; connect each client to ``127.0.0.1:target``
    inside the namespace of process ``pid`` and copy bytes both ways (half-closes included)."""

    def __init__(self, pid: int, target_port: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self._netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.target_port = target_port
        self._listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = False
        threading.Thread(target=self._accept, name="netns-forwarder", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            _enter_netns(self._netns)
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()  # like a refused connection: the caller's probe simply fails
            return
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._listener.close()
            os.close(self._netns)


def container_pid(name: str) -> int:
    pid = int(podman("inspect", "-f", "{{.State.Pid}}", name).stdout.strip() or 0)
    if pid <= 0:
        raise RuntimeError(f"container {name} is not running")
    return pid
