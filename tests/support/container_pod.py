"""Container mode for the Kubernetes emulator: each pod is a podman container of its image.

Use :class:`ContainerPods` as the emulator's ``pod_command``::

    pods = ContainerPods()
    with KubeEmulator(root, pod_command=pods):
        ...
    pods.cleanup()

The emulated kubelet still runs one host process per pod under ``pod_init`` (so pod status,
deletion and grace periods work as in process mode); that process is this module's launcher,
which starts the container and stays in the foreground until it exits. What the container gets
from the pod spec (only what our execution pods use; anything else is refused with a clear error,
which fails the pod like a ``CreateContainerConfigError``):

* image (never pulled: it must have been built here), ``command`` → entrypoint, ``args``, ``env``
  (plain values), ``workingDir``;
* ``securityContext`` of pod and container: ``runAsUser``/``runAsGroup`` (container wins),
  ``runAsNonRoot`` (checked against the image's user like the kubelet does), ``fsGroup`` as a
  supplementary group, ``readOnlyRootFilesystem`` (podman's own ``/tmp`` tmpfs switched off, so only
  volumes are writable), ``allowPrivilegeEscalation: false`` → ``no-new-privileges``, capability
  drops/adds, ``seccompProfile`` (``RuntimeDefault`` = podman's default profile);
* ``emptyDir`` volumes → tmpfs at each ``volumeMount`` (``sizeLimit`` → tmpfs size; exec allowed
  as on an emptyDir); ``resources.limits`` memory and cpu;
* no network (``--network none``) except the container port, which the launcher forwards from the
  pod's loopback address (the emulator's ``podIP``) into the container's own namespace.

Signals: SIGTERM from ``pod_init`` (a graceful delete) becomes a SIGTERM to the container's main
process; if the grace period runs out, ``pod_init`` kills the launcher and every descendant,
which includes the container (conmon re-parents to ``pod_init``, a child subreaper).
:meth:`ContainerPods.cleanup` removes whatever podman still lists for this emulator.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from .containers import PODMAN, ROOT, ULIMITS, NetnsForwarder, container_pid, podman

LABEL = "io.kcr-trio.emulator"
LAUNCHER = "io.kcr-trio.launcher-pid"

_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "m": 10**-3}


class PodSpecError(ValueError):
    """The pod spec asks for something this container mode does not do."""


def quantity(value: str | float) -> float:
    """A Kubernetes resource quantity (``512Mi``, ``1Gi``, ``500m``, ``2``) as a number."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise PodSpecError(f"bad quantity {value!r}")
    number, unit = float(m[1]), m[2]
    if unit in _BINARY:
        return number * _BINARY[unit]
    if unit in _DECIMAL:
        return number * _DECIMAL[unit]
    raise PodSpecError(f"bad quantity unit in {value!r}")


def image_user(image: str) -> str:
    return podman("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()


def run_argv(pod: Mapping[str, Any], *, name: str, labels: Mapping[str, str] = {},
             image_user_of: Any = image_user) -> tuple[list[str], int]:
    """``podman run`` arguments for the pod's (first) container, and the container port the
    kubelet must reach. Raises :class:`PodSpecError` for what it cannot honour."""
    spec = pod["spec"]
    c = spec["containers"][0]
    image = c.get("image") or ""
    if not image:
        raise PodSpecError("spec.containers[0].image: Required value")
    psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
    argv = ["run", "-d", "--name", name, "--pull", "never", "--network", "none", *ULIMITS]
    for k, v in labels.items():
        argv += ["--label", f"{k}={v}"]

    user, group = csc.get("runAsUser", psc.get("runAsUser")), csc.get("runAsGroup", psc.get("runAsGroup"))
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        effective = str(user) if user is not None else image_user_of(image).split(":")[0]
        if not effective.isdigit():
            raise PodSpecError(f"container has runAsNonRoot and image has non-numeric user ({effective or 'root'}), "
                               "cannot verify user is non-root")
        if int(effective) == 0:
            raise PodSpecError("container has runAsNonRoot and image will run as root")
    if user is not None:
        argv += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if psc.get("fsGroup") is not None:
        argv += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        argv += ["--read-only", "--read-only-tmpfs=false"]
    if csc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    caps = csc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        argv += ["--cap-drop", cap.lower()]
    for cap in caps.get("add") or []:
        argv += ["--cap-add", cap.lower()]
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        argv += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise PodSpecError(f"seccompProfile {seccomp} is not supported here")

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in c.get("volumeMounts") or []:
        vol = volumes.get(mount["name"])
        if vol is None:
            raise PodSpecError(f"volumeMounts: volume {mount['name']!r} not found")
        if "emptyDir" not in vol:
            raise PodSpecError(f"volume {mount['name']!r}: only emptyDir volumes are supported here")
        # Empty and writable for the pod's user, like an emptyDir (0777). podman gives a tmpfs over
        # an image directory that directory's mode whatever ``mode=`` says; ``U`` chowns it to the user.
        opts = ["rw", "exec", "nosuid", "nodev", "notmpcopyup", "mode=1777", "U"]
        size = (vol["emptyDir"] or {}).get("sizeLimit")
        if size:
            opts.append(f"size={int(quantity(size))}")
        argv += ["--tmpfs", f"{mount['mountPath']}:{','.join(opts)}"]

    for e in c.get("env") or []:
        if "value" not in e:
            raise PodSpecError(f"env {e.get('name')}: only plain values are supported here")
        argv += ["--env", f"{e['name']}={e['value']}"]
    if c.get("workingDir"):
        argv += ["--workdir", c["workingDir"]]
    limits = (c.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        argv += ["--memory", str(int(quantity(limits["memory"])))]
    if "cpu" in limits:
        argv += ["--cpus", f"{quantity(limits['cpu']):g}"]
    command = c.get("command") or []
    if command:
        argv += ["--entrypoint", json.dumps(command)]
    argv.append(image)
    argv += [str(a) for a in c.get("args") or []]
    ports = c.get("ports") or []
    port = int(ports[0]["containerPort"]) if ports else 8080
    return argv, port


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


class ContainerPods:
    """The emulator's ``pod_command`` in container mode (see the module docstring).

    A force delete (grace 0) or an expired grace period makes ``pod_init`` SIGKILL the launcher
    and every descendant, container processes included, but conmon dies with them, so podman
    still lists the container as running. A reaper thread plays the container runtime's part: it
    removes every container of ours whose launcher (``LAUNCHER`` label) is gone."""

    def __init__(self, reap_interval: float = 0.5) -> None:
        self.instance = secrets.token_hex(4)
        self.leaked: list[str] = []
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(reap_interval,), daemon=True,
                                        name="container-pod-reaper")
        self._reaper.start()

    def _reap(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.leaked += self._reap_once()

    def _reap_once(self) -> list[str]:
        """Remove our containers whose launcher is gone; returns those whose main process was
        still alive then (a container that outlived its pod)."""
        listing = podman("ps", "-a", "--filter", f"label={LABEL}={self.instance}", "--format",
                         f'{{{{.Names}}}} {{{{index .Labels "{LAUNCHER}"}}}}', check=False).stdout
        orphans = [name for name, _, pid in (line.partition(" ") for line in listing.splitlines())
                   if pid.strip().isdigit() and not _alive(int(pid))]
        leaked = []
        for name in orphans:
            pid = podman("inspect", "-f", "{{.State.Pid}}", name, check=False).stdout.strip()
            if pid.isdigit() and int(pid) > 0 and _alive(int(pid)):
                leaked.append(name)
        if orphans:
            podman("rm", "-f", "-t", "0", *orphans, check=False)
        return leaked

    def container_name(self, namespace: str, pod_name: str) -> str:
        return f"kcr-emu-{self.instance}-{namespace}-{pod_name}"

    def __call__(self, pod: dict[str, Any], ip: str, port: int, workdir: Path) -> list[str]:
        meta = pod["metadata"]
        name = self.container_name(meta.get("namespace", "default"), meta["name"])
        try:
            argv, cport = run_argv(pod, name=name, labels={LABEL: self.instance})
        except (PodSpecError, subprocess.CalledProcessError) as exc:
            message = f"CreateContainerConfigError: {exc}"
            return [sys.executable, "-c", "import sys; sys.exit(sys.argv[1])", message]
        boot = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.support.container_pod import main; sys.exit(main(sys.argv[1:]))"
        return [sys.executable, "-c", boot, "--listen", f"{ip}:{port}", "--target-port", str(cport),
                "--name", name, "--", *argv]

    def cleanup(self) -> list[str]:
        """Stop the reaper and remove every container this instance created. Returns the ones
        that outlived their pod: still running although their launcher (the pod's process) was
        gone, or, after the emulator closed, still running at all. Stale entries of containers
        whose processes died with their pod are only removed."""
        self._stop.set()
        self._reaper.join(timeout=30)
        leaked = self.leaked + self._reap_once()
        found = podman("ps", "-a", "--filter", f"label={LABEL}={self.instance}", "--format", "{{.Names}}").stdout.split()
        if found:
            podman("rm", "-f", "-t", "0", *found, check=False)
        return leaked + found


def main(argv: list[str]) -> int:
    """The launcher: start the container, forward its port, wait, exit with its exit code."""
    split = argv.index("--")
    opts, run = argv[:split], argv[split + 1:]
    o = dict(zip(opts[0::2], opts[1::2]))
    host, _, port = o["--listen"].rpartition(":")
    name = o["--name"]
    run = [run[0], "--label", f"{LAUNCHER}={os.getpid()}", *run[1:]]  # for the reaper
    stopping = threading.Event()
    started_ok = threading.Event()

    def stop() -> None:
        subprocess.Popen([*PODMAN, "kill", "--signal", "TERM", name],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def on_term(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            if started_ok.is_set():
                stop()

    signal.signal(signal.SIGTERM, on_term)  # before the start: a delete may come at any time
    started = subprocess.run([*PODMAN, *run], capture_output=True, text=True, check=False)
    if started.returncode != 0:
        print(f"podman run failed: {started.stderr.strip()}", file=sys.stderr, flush=True)
        subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True, check=False)
        return 128 if started.returncode > 127 else started.returncode or 1
    started_ok.set()
    if stopping.is_set():
        stop()
    forwarder = None
    try:
        forwarder = NetnsForwarder(container_pid(name), int(o["--target-port"]), host, int(port))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"cannot reach the container's network namespace: {exc}", file=sys.stderr, flush=True)
    logs = subprocess.Popen([*PODMAN, "logs", "-f", name])  # the container's output is the pod's log
    waited = subprocess.run([*PODMAN, "wait", name], capture_output=True, text=True, check=False)
    try:
        code = int(waited.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        code = 1
    try:
        logs.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logs.kill()
    if forwarder:
        forwarder.close()
    subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True, check=False)
    return code


class RunningContainer:
    """A container started from a pod spec in this process, reachable at :attr:`url` (tests)."""

    def __init__(self, pod: Mapping[str, Any], name: str | None = None) -> None:
        self.name = name or f"kcr-test-{secrets.token_hex(4)}"
        self.pod = pod
        self.forwarder: NetnsForwarder | None = None

    def __enter__(self) -> Self:
        argv, port = run_argv(self.pod, name=self.name, labels={LABEL: "test"})
        podman(*argv)
        try:
            self.forwarder = NetnsForwarder(container_pid(self.name), port)
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def url(self) -> str:
        assert self.forwarder is not None
        host, port = self.forwarder.address
        return f"http://{host}:{port}"

    def logs(self) -> str:
        p = podman("logs", self.name, check=False)
        return p.stdout + p.stderr

    def exec(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *cmd, check=False)

    def __exit__(self, *exc: object) -> None:
        if self.forwarder:
            self.forwarder.close()
        podman("rm", "-f", "-t", "0", self.name, check=False)


def pod_spec(image: str, *, env: Mapping[str, str] = {}, port: int = 8080,
             mounts: Mapping[str, str] = {"data": "/mnt/data", "tmp": "/tmp"}) -> dict[str, Any]:
    """A minimal pod in the shape the executor creates: uid 65532, read-only root, emptyDirs."""
    return {
        "metadata": {"name": "smoke"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
            "containers": [{
                "name": "main", "image": image,
                "ports": [{"containerPort": port}],
                "env": [{"name": k, "value": v} for k, v in env.items()],
                "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": n, "mountPath": p} for n, p in mounts.items()],
            }],
            "volumes": [{"name": n, "emptyDir": {"sizeLimit": "256Mi"}} for n in mounts],
        },
    }
