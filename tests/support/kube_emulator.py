"""A small Kubernetes API server for tests: core/v1 pods, spoken over real HTTP.

No cluster can run on these machines, so the Kubernetes executor is tested against this emulator.
It speaks the real REST/JSON wire format, so the official ``kubernetes`` Python client (configured
by the kubeconfig :meth:`KubeEmulator.write_kubeconfig` writes) cannot tell it from a cluster:

* ``POST   /api/v1/namespaces/{ns}/pods``           create (``generateName`` honoured; 409 on clash)
* ``GET    /api/v1/namespaces/{ns}/pods/{name}``    read (404 ``Status`` when missing)
* ``GET    /api/v1[/namespaces/{ns}]/pods``         list, ``labelSelector`` with ``=``, ``==``, ``!=``,
  ``in``, ``notin``, exists and ``!key``; ``?watch=true`` streams newline-delimited JSON events
  (``ADDED``/``MODIFIED``/``DELETED``, ``BOOKMARK`` when ``allowWatchBookmarks``, or ``ERROR`` 410
  for an expired ``resourceVersion``) with chunked transfer encoding, honouring
  ``resourceVersion`` and ``timeoutSeconds``
* ``DELETE /api/v1/namespaces/{ns}/pods/{name}``    graceful delete (``gracePeriodSeconds`` in the
  query or a ``DeleteOptions`` body): the pod gets a ``deletionTimestamp``, its processes get
  SIGTERM, and ``DELETED`` is sent once they are gone
* ``GET    /api/v1/namespaces/{ns}/pods/{name}/log`` the container's output

The emulated kubelet runs every pod as a real process: by default the project's sidecar
(``python -m sidecar``), or for KubeCodeRun runner pods (no ``env`` in the container) the runner
double :mod:`tests.support.kcr_runner_double`, listening on the pod's own loopback address (``127.A.B.C``, a block chosen at
random per emulator so parallel emulators do not collide) and the container port from the pod spec.
The process is started under ``pod_init.py``, a container-like init that takes the whole process
tree down with it. Status follows Kubernetes: ``Pending`` → ``Running`` (``podIP`` set) → ``Ready``
condition once the container's ``readinessProbe`` (HTTP GET) answers 200; a process that exits makes
the pod ``Failed`` with a ``terminated`` container state (``exitCode`` 128+signal when killed).

Failure injection for tests: :attr:`KubeEmulator.failing_images` (image pull errors: the pod stays
``Pending`` with ``ErrImagePull``/``ImagePullBackOff``), :attr:`~KubeEmulator.flaky_images`
(transient pull errors, retried by the kubelet), :attr:`~KubeEmulator.pull_delays` (slow first
pulls), :attr:`~KubeEmulator.node_labels` (a pod whose ``nodeSelector`` does not match stays
``Pending``/``Unschedulable``), :meth:`~KubeEmulator.inject` (API-server errors such as 403, 429 or
503 with ``Retry-After``, per verb and namespace), :meth:`~KubeEmulator.compact`,
:meth:`~KubeEmulator.send_bookmarks`, :meth:`oom_kill`, :meth:`evict`, and a real ``kill -9`` of
:meth:`main_pid`.

Container mode: pass ``pod_command=ContainerPods()`` (:mod:`tests.support.container_pod`) and each
pod becomes a podman container of its image, with the pod spec's user, read-only root, emptyDirs,
env and args, and no network but its container port (``tests/integration/images``).

Built on the standard library's threading HTTP server: the emulator is infrastructure beside the
code under test, independent of the test's Trio loop, and must keep serving while a test blocks.
"""

from __future__ import annotations

import copy
import datetime as dt
import http.server
import json
import os
import queue
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POD_INIT = str(Path(__file__).with_name("pod_init.py"))
RUNNER_DOUBLE = Path(__file__).with_name("kcr_runner_double.py")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName suffixes


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# label selectors


_REQ_RE = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_.\-/]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<val>[A-Za-z0-9_.\-]*)|\s+(?P<setop>in|notin)\s*\((?P<vals>[^)]*)\))?\s*$"
)


def _split_selector(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_selector(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector into a predicate; raises ``ValueError`` on bad syntax."""
    reqs: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_selector(selector or ""):
        m = _REQ_RE.match(part)
        if not m:
            raise ValueError(f"unable to parse requirement: {part!r}")
        key = m["key"]
        if m["neg"]:
            if m["op"] or m["setop"]:
                raise ValueError(f"unable to parse requirement: {part!r}")
            reqs.append(lambda labels, k=key: k not in labels)
        elif m["op"] in ("=", "=="):
            reqs.append(lambda labels, k=key, v=m["val"]: labels.get(k) == v)
        elif m["op"] == "!=":
            reqs.append(lambda labels, k=key, v=m["val"]: labels.get(k) != v)
        elif m["setop"]:
            vals = {v.strip() for v in m["vals"].split(",") if v.strip()}
            if m["setop"] == "in":
                reqs.append(lambda labels, k=key, vs=vals: labels.get(k) in vs)
            else:
                reqs.append(lambda labels, k=key, vs=vals: labels.get(k) not in vs)
        else:
            reqs.append(lambda labels, k=key: k in labels)
    return lambda labels: all(r(labels) for r in reqs)


# --------------------------------------------------------------------------------------------
# state


@dataclass
class _Pod:
    obj: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    ip: str | None = None
    workdir: Path | None = None
    log: Path | None = None
    run: bool = True
    deleting: bool = False
    oom: bool = False
    evicted: bool = False
    main_pid: int | None = None


@dataclass
class _Watcher:
    namespace: str | None
    matches: Callable[[dict[str, str]], bool]
    events: queue.Queue[tuple[str, dict[str, Any]] | None] = field(default_factory=queue.Queue)
    bookmarks: bool = False  # the client asked for allowWatchBookmarks


@dataclass
class Fault:
    """An API-server error injected for matching requests (see :meth:`KubeEmulator.inject`)."""

    verb: str  # create, get, list, watch, delete
    status: int
    message: str
    reason: str = ""
    namespace: str | None = None  # None: any namespace
    times: int | None = None  # None: until removed
    retry_after: float | None = None
    hits: int = 0


class KubeEmulator:
    """The API server plus an emulated kubelet. Use as a context manager (or ``start``/``close``)."""

    def __init__(
        self,
        work_root: Path,
        *,
        namespaces: Iterable[str] = ("default",),
        pod_command: Callable[[dict[str, Any], str, int, Path], list[str]] | None = None,
        probe_interval: float = 0.05,
        max_grace: float = 3.0,
    ) -> None:
        self.work_root = Path(work_root)
        self.namespaces = set(namespaces)
        self.token = secrets.token_urlsafe(16)
        self.pod_command = pod_command or self._default_pod_command
        # Environment of KubeCodeRun runner images (as their ``env -i`` entrypoint would set it),
        # e.g. ``{"MAX_EXECUTION_TIME": "2"}`` for an image built with a short cap.
        self.runner_env: dict[str, str] = {}
        self.probe_interval = probe_interval
        self.max_grace = max_grace
        # Image names containing any of these substrings fail to pull.
        self.failing_images: set[str] = set()
        # Counts of (method, resource) served, e.g. ("GET", "pod"), ("WATCH", "pods").
        self.requests: Counter[tuple[str, str]] = Counter()
        # Every API call as (monotonic time, verb, namespace, HTTP status), in order.
        self.calls: list[tuple[float, str, str | None, int]] = []
        self.faults: list[Fault] = []
        # The one node's labels: a pod whose nodeSelector does not match stays Pending with
        # PodScheduled=False/Unschedulable until they do (as when an autoscaler adds a node).
        self.node_labels: dict[str, str] = {"kubernetes.io/hostname": "emulated-node", "kubernetes.io/os": "linux"}
        # Image substring -> seconds its pull takes (the container waits in ContainerCreating).
        self.pull_delays: dict[str, float] = {}
        # Image substring -> pulls that fail with a transient error before one succeeds.
        self.flaky_images: dict[str, int] = {}
        self.pull_backoff = 0.3  # the kubelet's back-off between pull attempts (ImagePullBackOff)
        self.bookmark_interval = 1.0  # idle watches that allow bookmarks get one this often
        self._lock = threading.RLock()
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._rv = 1000
        self._watchers: list[_Watcher] = []
        self._history: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, ns, type, obj
        self._history_floor = 0  # watches from a resourceVersion below this get 410 Gone
        self._server: http.server.ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._ip_block = (random.randint(10, 250), random.randint(0, 255))
        self._ip_next = 2
        self._ips_in_use: set[str] = set()
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> KubeEmulator:
        self.work_root.mkdir(parents=True, exist_ok=True)
        emulator = self

        class Handler(_Handler):
            emu = emulator

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, name="kube-emulator", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop every pod process (and its tree), end all watches, stop serving."""
        with self._lock:
            self._closed = True
            pods = list(self._pods.values())
            watchers = list(self._watchers)
        for pod in pods:
            if pod.proc and pod.proc.poll() is None:
                pod.proc.send_signal(signal.SIGUSR1)
        for pod in pods:
            if pod.proc:
                try:
                    pod.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pod.proc.kill()
                    pod.proc.wait()
        for w in watchers:
            w.events.put(None)
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig pointing at this emulator with a bearer token (JSON is valid YAML)."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}
            ],
            "current-context": "emulator",
        }
        path.write_text(json.dumps(cfg))
        return path

    # ---------------------------------------------------------------- inspection and injection

    def pods(self, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
        matches = parse_selector(selector)
        with self._lock:
            return [
                copy.deepcopy(p.obj)
                for (ns, _), p in self._pods.items()
                if (namespace is None or ns == namespace) and matches(p.obj["metadata"].get("labels") or {})
            ]

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            p = self._pods.get((namespace, name))
            return copy.deepcopy(p.obj) if p else None

    def add_pod(self, namespace: str, manifest: dict[str, Any], *, run: bool = False) -> dict[str, Any]:
        """Create a pod directly (e.g. an API replica's own pod); ``run=False`` starts no process
        and marks it Running and Ready at once."""
        status, obj = self._create(namespace, manifest, run=run)
        if status != 201:
            raise ValueError(obj.get("message"))
        return obj

    def main_pid(self, namespace: str, name: str) -> int | None:
        """PID of the pod's main process (the sidecar), for a real ``kill -9`` from a test."""
        with self._lock:
            p = self._pods.get((namespace, name))
            return p.main_pid if p else None

    def workdir(self, namespace: str, name: str) -> Path | None:
        """The host directory standing in for the pod's ``/mnt/data`` emptyDir."""
        with self._lock:
            p = self._pods.get((namespace, name))
            return p.workdir if p else None

    def oom_kill(self, namespace: str, name: str) -> None:
        """Kill the container as the kernel's OOM killer would: SIGKILL, reason ``OOMKilled``."""
        with self._lock:
            p = self._pods[(namespace, name)]
            p.oom = True
            pid = p.main_pid
        if pid:
            _signal(pid, signal.SIGKILL)

    def evict(self, namespace: str, name: str) -> None:
        """Evict the pod as node-pressure eviction does: ``Failed`` with reason ``Evicted``."""
        with self._lock:
            p = self._pods[(namespace, name)]
            p.evicted = True
            proc = p.proc
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)

    def drop_watches(self, *, compact: bool = False, abrupt: bool = False) -> int:
        """End every open watch stream (as an API server restart or a load balancer would). With
        ``compact``, also forget the event history, so resuming from an old ``resourceVersion``
        gets ``410 Gone`` and the client must list again. With ``abrupt``, cut the connection in
        the middle of an event instead of ending the stream. Returns how many watches were ended."""
        with self._lock:
            watchers = list(self._watchers)
            if compact:
                self._rv += 1
                self._history_floor = self._rv  # any older resourceVersion is now "too old"
                self._history.clear()
        for w in watchers:
            w.events.put(("CUT", {}) if abrupt else None)
        return len(watchers)

    def inject(self, verb: str, status: int, message: str, *, reason: str = "", namespace: str | None = None,
               times: int | None = None, retry_after: float | None = None) -> Fault:
        """Answer the next ``times`` (default: all) ``verb`` requests with an error ``Status``, as
        RBAC (403 Forbidden), admission (Pod Security, quota: 403), priority and fairness (429) or
        an overloaded API server (5xx) would; ``retry_after`` adds a ``Retry-After`` header."""
        default_reason = {403: "Forbidden", 409: "AlreadyExists", 422: "Invalid", 429: "TooManyRequests",
                          500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
        fault = Fault(verb, status, message, reason or default_reason.get(status, "Unknown"), namespace, times,
                      retry_after)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _fault(self, verb: str, namespace: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.verb == verb and fault.namespace in (None, namespace):
                    fault.hits += 1
                    if fault.times is not None and fault.hits >= fault.times:
                        self.faults.remove(fault)
                    return fault
        return None

    def calls_of(self, verb: str) -> list[tuple[float, str, str | None, int]]:
        with self._lock:
            return [c for c in self.calls if c[1] == verb]

    def send_bookmarks(self) -> int:
        """A BOOKMARK with the current resourceVersion to every watch that allows them, as the API
        server sends periodically. Returns how many were sent."""
        sent = 0
        with self._lock:
            for w in self._watchers:
                if w.bookmarks and w.events.empty():
                    w.events.put(("BOOKMARK", _bookmark(self._rv)))
                    sent += 1
        return sent

    def compact(self) -> int:
        """Forget the event history up to now (etcd compaction): a watch resuming from any older
        resourceVersion gets 410 Gone. Returns the current resourceVersion."""
        with self._lock:
            self._history_floor = self._rv
            self._history.clear()
            return self._rv

    # ---------------------------------------------------------------- internals: state changes

    def _bump(self, ns: str, kind: str, pod: _Pod) -> None:
        """Record a change (caller holds the lock) and fan it out to matching watchers."""
        self._rv += 1
        pod.obj["metadata"]["resourceVersion"] = str(self._rv)
        snapshot = copy.deepcopy(pod.obj)
        self._history.append((self._rv, ns, kind, snapshot))
        if len(self._history) > 5000:
            self._history_floor = self._history[999][0]
            del self._history[:1000]
        labels = snapshot["metadata"].get("labels") or {}
        for w in self._watchers:
            if (w.namespace is None or w.namespace == ns) and w.matches(labels):
                w.events.put((kind, snapshot))

    def _allocate_ip(self, port: int) -> str:
        with self._lock:
            while True:
                a, b = self._ip_block
                ip = f"127.{a}.{b}.{self._ip_next}"
                self._ip_next += 1
                if self._ip_next > 254:
                    self._ip_next = 2
                    self._ip_block = (a, (b + 1) % 256)
                if ip in self._ips_in_use:
                    continue
                try:
                    with socket.socket() as s:
                        s.bind((ip, port))
                except OSError:
                    continue
                self._ips_in_use.add(ip)
                return ip

    def _create(self, ns: str, body: dict[str, Any], *, run: bool = True) -> tuple[int, dict[str, Any]]:
        if ns not in self.namespaces:
            return 404, _status(404, "NotFound", f'namespaces "{ns}" not found')
        if not isinstance(body, dict) or body.get("kind", "Pod") != "Pod":
            return 400, _status(400, "BadRequest", "the body must be a Pod")
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = "Pod", "v1"
        meta = obj.setdefault("metadata", {})
        spec = obj.get("spec") or {}
        if not spec.get("containers"):
            return 422, _status(422, "Invalid", "spec.containers: Required value")
        with self._lock:
            if self._closed:
                return 503, _status(503, "ServiceUnavailable", "emulator is shutting down")
            if not meta.get("name"):
                if not meta.get("generateName"):
                    return 422, _status(422, "Invalid", "metadata.name: Required value")
                meta["name"] = meta["generateName"] + "".join(random.choices(_NAME_CHARS, k=5))
            name = meta["name"]
            if (ns, name) in self._pods:
                return 409, _status(409, "AlreadyExists", f'pods "{name}" already exists')
            meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
            obj["status"] = {"phase": "Pending", "qosClass": "Burstable"}
            pod = _Pod(obj=obj, run=run)
            self._pods[(ns, name)] = pod
            self._bump(ns, "ADDED", pod)
            result = copy.deepcopy(obj)
        thread = threading.Thread(target=self._kubelet, args=(ns, name), daemon=True, name=f"kubelet-{name}")
        thread.start()
        return 201, result

    def _update(self, ns: str, name: str, change: Callable[[_Pod], None]) -> _Pod | None:
        with self._lock:
            pod = self._pods.get((ns, name))
            if pod is None:
                return None
            change(pod)
            self._bump(ns, "MODIFIED", pod)
            return pod

    def _remove(self, ns: str, name: str) -> None:
        with self._lock:
            pod = self._pods.pop((ns, name), None)
            if pod is None:
                return
            if pod.ip:
                self._ips_in_use.discard(pod.ip)
            self._bump(ns, "DELETED", pod)

    def _delete(self, ns: str, name: str, grace: float | None) -> tuple[int, dict[str, Any]]:
        with self._lock:
            pod = self._pods.get((ns, name))
            if pod is None:
                return 404, _status(404, "NotFound", f'pods "{name}" not found', name=name)
            if grace is None:
                grace = float(pod.obj["spec"].get("terminationGracePeriodSeconds", 30))
            alive = pod.proc is not None and pod.proc.poll() is None
            if not alive:
                result = copy.deepcopy(pod.obj)
                self._remove(ns, name)
                return 200, result
            if not pod.deleting:
                pod.deleting = True
                pod.obj["metadata"]["deletionTimestamp"] = _now()
                pod.obj["metadata"]["deletionGracePeriodSeconds"] = int(grace)
                self._bump(ns, "MODIFIED", pod)
                proc = pod.proc
                proc.send_signal(signal.SIGUSR1 if grace <= 0 else signal.SIGTERM)
                if grace > 0:  # the kubelet's kill after the grace period of *this* request
                    def force() -> None:
                        if proc.poll() is None:
                            proc.send_signal(signal.SIGUSR1)

                    timer = threading.Timer(min(grace, self.max_grace), force)
                    timer.daemon = True
                    timer.start()
            return 200, copy.deepcopy(pod.obj)

    # ---------------------------------------------------------------- the emulated kubelet

    def _kubelet(self, ns: str, name: str) -> None:
        """Drive one pod: schedule, pull (or fail to), start, probe readiness, watch for exit."""
        with self._lock:
            pod = self._pods.get((ns, name))
            if pod is None:
                return
            spec = pod.obj["spec"]
            container = spec["containers"][0]
            image = container.get("image", "")
            run = pod.run

        wanted = spec.get("nodeSelector") or {}
        if run and not self._fits(wanted):
            message = ("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
                       "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.")

            def unschedulable(p: _Pod) -> None:
                p.obj["status"]["conditions"] = [_cond("PodScheduled", False, "Unschedulable", message)]

            self._update(ns, name, unschedulable)
            while not self._fits(wanted):
                if not self._pending_sleep(ns, name, self.probe_interval):
                    return

        def scheduled(p: _Pod) -> None:
            p.obj["spec"]["nodeName"] = "emulated-node"
            p.obj["status"]["conditions"] = [_cond("PodScheduled", True)]
            if run:
                p.obj["status"]["containerStatuses"] = [_cstatus(container, waiting={"reason": "ContainerCreating"})]

        self._update(ns, name, scheduled)
        if not run:
            def static_ready(p: _Pod) -> None:
                p.obj["status"].update(
                    phase="Running", podIP="127.0.0.1", hostIP="127.0.0.1", startTime=_now(),
                    conditions=[_cond(t, True) for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                )

            self._update(ns, name, static_ready)
            return
        while any(bad in image for bad in self.failing_images):  # the kubelet retries the pull
            for reason in ("ErrImagePull", "ImagePullBackOff"):
                def pull_failed(p: _Pod, reason: str = reason) -> None:
                    p.obj["status"]["containerStatuses"] = [
                        _cstatus(container, waiting={
                            "reason": reason,
                            "message": f'Back-off pulling image "{image}"'
                            if reason == "ImagePullBackOff"
                            else f'failed to pull image "{image}": not found',
                        })
                    ]

                self._update(ns, name, pull_failed)
            if not self._pending_sleep(ns, name, self.pull_backoff * 3):
                return
        if not self._pull(ns, name, container, image):
            return

        port = _container_port(container)
        ip = self._allocate_ip(port)
        workdir = self.work_root / ns / name / "data"
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir.parent / "container.log"
        grace = min(float(spec.get("terminationGracePeriodSeconds", 30)), self.max_grace)
        argv = [sys.executable, POD_INIT, str(grace), "--", *self.pod_command(pod.obj, ip, port, workdir)]
        with self._lock:
            if pod.deleting or self._closed or (ns, name) not in self._pods:
                self._ips_in_use.discard(ip)
                self._remove(ns, name)
                return
            with open(log, "wb") as fh:
                pod.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            pod.ip, pod.workdir, pod.log = ip, workdir, log

            def running(p: _Pod) -> None:
                st = p.obj["status"]
                st.update(phase="Running", podIP=ip, podIPs=[{"ip": ip}], hostIP="127.0.0.1", startTime=_now())
                st["conditions"] = [
                    _cond("PodScheduled", True), _cond("Initialized", True),
                    _cond("ContainersReady", False), _cond("Ready", False),
                ]
                st["containerStatuses"] = [_cstatus(container, running={"startedAt": _now()})]

            self._update(ns, name, running)
        proc = pod.proc
        pod.main_pid = _wait_for_child(proc.pid)

        probe = (container.get("readinessProbe") or {}).get("httpGet")
        ready = probe is None
        while proc.poll() is None and not ready:
            ready = _probe(ip, probe, port)
            if not ready:
                time.sleep(self.probe_interval)
        if ready and proc.poll() is None:
            def became_ready(p: _Pod) -> None:
                st = p.obj["status"]
                st["conditions"] = [
                    _cond(t, True) for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ]
                st["containerStatuses"][0]["ready"] = True

            self._update(ns, name, became_ready)
        code = proc.wait()
        with self._lock:
            if pod.deleting or self._closed:
                self._remove(ns, name)
                return

            def terminated(p: _Pod) -> None:
                st = p.obj["status"]
                st["phase"] = "Failed" if code != 0 or p.evicted else "Succeeded"
                reason = "OOMKilled" if p.oom else ("Completed" if code == 0 else "Error")
                started = st["containerStatuses"][0]["state"].get("running", {}).get("startedAt", _now())
                st["containerStatuses"] = [
                    _cstatus(container, terminated={
                        "exitCode": 137 if p.oom else code, "reason": reason,
                        "startedAt": started, "finishedAt": _now(),
                    })
                ]
                st["conditions"] = [
                    _cond("PodScheduled", True), _cond("Initialized", True),
                    _cond("ContainersReady", False, "PodFailed"), _cond("Ready", False, "PodFailed"),
                ]
                if p.evicted:
                    st["reason"] = "Evicted"
                    st["message"] = "The node was low on resource: memory. Threshold quantity: 100Mi."

            self._update(ns, name, terminated)


    def _default_pod_command(self, pod: dict[str, Any], ip: str, port: int, workdir: Path) -> list[str]:
        """KubeCodeRun runner pods (no ``env`` in the container: the language image bakes its
        configuration in) get the runner double; every other pod runs the project's sidecar."""
        if is_runner_pod(pod):
            return runner_pod_command(pod, ip, port, workdir, self.runner_env)
        return default_pod_command(pod, ip, port, workdir)


    def _fits(self, wanted: dict[str, str]) -> bool:
        with self._lock:
            return all(self.node_labels.get(k) == v for k, v in wanted.items())

    def _pending_sleep(self, ns: str, name: str, seconds: float) -> bool:
        """Sleep while the pod waits; False as soon as it is deleted (or the emulator closes)."""
        deadline = time.monotonic() + seconds
        while True:
            with self._lock:
                pod = self._pods.get((ns, name))
                if pod is None or pod.deleting or self._closed:
                    if pod is not None and pod.proc is None:
                        self._remove(ns, name)
                    return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))

    def _pull(self, ns: str, name: str, container: dict[str, Any], image: str) -> bool:
        """The image pull: transient failures first (``flaky_images``, each followed by the
        kubelet's back-off), then the pull itself (``pull_delays``). False if the pod went away."""
        while True:
            with self._lock:
                flaky = next((sub for sub, n in self.flaky_images.items() if n > 0 and sub in image), None)
                if flaky is not None:
                    self.flaky_images[flaky] -= 1
            if flaky is None:
                break
            for reason, wait in (("ErrImagePull", self.pull_backoff / 2), ("ImagePullBackOff", self.pull_backoff)):
                def pull_failed(p: _Pod, reason: str = reason) -> None:
                    message = (f'Back-off pulling image "{image}"' if reason == "ImagePullBackOff" else
                               f'failed to pull and unpack image "{image}": failed to copy: httpReadSeeker: '
                               "failed open: failed to do request: dial tcp 10.0.0.9:443: i/o timeout")
                    p.obj["status"]["containerStatuses"] = [_cstatus(container, waiting={
                        "reason": reason, "message": message})]

                self._update(ns, name, pull_failed)
                if not self._pending_sleep(ns, name, wait):
                    return False
        delay = max((d for sub, d in self.pull_delays.items() if sub in image), default=0.0)
        if delay:
            def creating(p: _Pod) -> None:
                p.obj["status"]["containerStatuses"] = [_cstatus(container, waiting={"reason": "ContainerCreating"})]

            self._update(ns, name, creating)
            return self._pending_sleep(ns, name, delay)
        return True


# --------------------------------------------------------------------------------------------
# helpers


def _bookmark(rv: int) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}


def is_runner_pod(pod: dict[str, Any]) -> bool:
    container = pod["spec"]["containers"][0]
    return not any(e.get("name") == "LANGUAGE" for e in container.get("env") or [])


def runner_pod_command(
    pod: dict[str, Any], ip: str, port: int, workdir: Path, extra_env: dict[str, str] | None = None
) -> list[str]:
    """The runner double, configured as a KubeCodeRun 3.x image would be: ``LANGUAGE`` baked in
    by image (TypeScript's image says ``js``, C++'s says ``c``), overridden by a ``LANGUAGE=<x>``
    in the pod's ``args`` (the image's ``env`` entrypoint applies it last)."""
    from .kcr_runner_double import baked_language

    container = pod["spec"]["containers"][0]
    env = {"LANGUAGE": baked_language(container.get("image", ""))
           or (pod["metadata"].get("labels") or {}).get("kubecoderun.io/language", "py")}
    env.update(extra_env or {})
    for arg in container.get("args") or []:
        key, sep, value = arg.partition("=")
        if sep and key.isupper():
            env[key] = value
    assignments = [f"{k}={v}" for k, v in env.items()]
    return ["/usr/bin/env", *assignments, sys.executable, str(RUNNER_DOUBLE),
            "--host", ip, "--port", str(port), "--working-dir", str(workdir)]


def default_pod_command(pod: dict[str, Any], ip: str, port: int, workdir: Path) -> list[str]:
    """Run the project's sidecar for the pod's language (the ``LANGUAGE`` env var, or the
    ``kubecoderun.io/language`` label)."""
    container = pod["spec"]["containers"][0]
    env = {e.get("name"): e.get("value") for e in container.get("env") or []}
    lang = env.get("LANGUAGE") or (pod["metadata"].get("labels") or {}).get("kubecoderun.io/language", "py")
    argv = [sys.executable, "-m", "sidecar", "--host", ip, "--port", str(port), "--language", lang,
            "--working-dir", str(workdir)]
    node_modules = Path(__file__).resolve().parents[1] / "node" / "node_modules"
    if lang == "ts" and node_modules.is_dir():  # where the test suite keeps `typescript`
        argv += ["--node-path", str(node_modules)]
    return argv


def _container_port(container: dict[str, Any]) -> int:
    for p in container.get("ports") or []:
        if p.get("containerPort"):
            return int(p["containerPort"])
    return 8080


def _probe(ip: str, probe: dict[str, Any], default_port: int) -> bool:
    port = probe.get("port", default_port)
    if not isinstance(port, int):  # a named port
        port = default_port
    url = f"http://{ip}:{port}{probe.get('path', '/')}"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return 200 <= resp.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_for_child(init_pid: int, timeout: float = 5.0) -> int | None:
    """The main process pod_init forked (its only child right after start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
        except OSError:
            return None
        if kids:
            return int(kids[0])
        time.sleep(0.005)
    return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _cond(kind: str, ok: bool, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    c = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": _now()}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def _cstatus(container: dict[str, Any], **state: Any) -> dict[str, Any]:
    return {
        "name": container.get("name", "main"),
        "image": container.get("image", ""),
        "imageID": "",
        "ready": False,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }


def _status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": {"kind": "pods", **details}, "code": code,
    }


_PODS = re.compile(r"^/api/v1(?:/namespaces/(?P<ns>[^/]+))?/pods(?:/(?P<name>[^/]+)(?P<log>/log)?)?$")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms stalls
    emu: KubeEmulator

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing

    def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._record(code)
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, code: int) -> None:
        verb, ns = getattr(self, "_call", ("", None))
        if verb:
            with self.emu._lock:
                self.emu.calls.append((time.monotonic(), verb, ns, code))
            self._call = ("", None)

    def _faulted(self, verb: str, ns: str | None, name: str | None = None) -> bool:
        """Record the call; answer it with an injected fault if one matches."""
        self._call = (verb, ns)
        fault = self.emu._fault(verb, ns)
        if fault is None:
            return False
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        details = {"name": name} if name else {}
        self._send(fault.status, _status(fault.status, fault.reason, fault.message, **details), headers)
        return True

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw.strip() else None

    def _route(self) -> tuple[re.Match[str] | None, dict[str, str]]:
        parsed = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        return _PODS.match(parsed.path), query

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.emu.token}":
            return True
        self._body()
        self._send(401, _status(401, "Unauthorized", "Unauthorized"))
        return False

    # -- verbs

    def do_GET(self) -> None:
        if not self._authorised():
            return
        m, q = self._route()
        if m is None:
            if self.path.split("?")[0] == "/version":
                self._send(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-emulated"})
            else:
                self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return
        ns, name = m["ns"], m["name"]
        if name is None:
            try:
                matches = parse_selector(q.get("labelSelector"))
            except ValueError as exc:
                self._send(400, _status(400, "BadRequest", str(exc)))
                return
            if q.get("watch") in ("true", "1"):
                if self._faulted("watch", ns):
                    return
                self.emu.requests["WATCH", "pods"] += 1
                self._watch(ns, matches, q)
                return
            if self._faulted("list", ns):
                return
            self.emu.requests["LIST", "pods"] += 1
            with self.emu._lock:
                items = [
                    copy.deepcopy(p.obj)
                    for (pns, _), p in self.emu._pods.items()
                    if (ns is None or pns == ns) and matches(p.obj["metadata"].get("labels") or {})
                ]
                rv = str(self.emu._rv)
            self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})
            return
        with self.emu._lock:
            pod = self.emu._pods.get((ns, name))
            obj = copy.deepcopy(pod.obj) if pod else None
            log = pod.log if pod else None
        if obj is None:
            self._send(404, _status(404, "NotFound", f'pods "{name}" not found', name=name))
            return
        if m["log"]:
            self.emu.requests["GET", "pods/log"] += 1
            data = log.read_bytes() if log and log.exists() else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self._faulted("get", ns, name):
            return
        self.emu.requests["GET", "pod"] += 1
        self._send(200, obj)

    def do_POST(self) -> None:
        if not self._authorised():
            return
        m, _ = self._route()
        try:
            body = self._body()
        except ValueError:
            self._send(400, _status(400, "BadRequest", "invalid JSON body"))
            return
        if m is None or m["name"] or not m["ns"]:
            self._send(405, _status(405, "MethodNotAllowed", "the server does not allow this method"))
            return
        if self._faulted("create", m["ns"], (body or {}).get("metadata", {}).get("name")):
            return
        self.emu.requests["CREATE", "pod"] += 1
        code, obj = self.emu._create(m["ns"], body)
        self._send(code, obj)

    def do_DELETE(self) -> None:
        if not self._authorised():
            return
        m, q = self._route()
        try:
            body = self._body() or {}
        except ValueError:
            body = {}
        if m is None or not m["name"] or not m["ns"]:
            self._send(405, _status(405, "MethodNotAllowed", "the server does not allow this method"))
            return
        if self._faulted("delete", m["ns"], m["name"]):
            return
        self.emu.requests["DELETE", "pod"] += 1
        grace = q.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
        code, obj = self.emu._delete(m["ns"], m["name"], None if grace is None else float(grace))
        self._send(code, obj)

    # -- watch

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, ns: str | None, matches: Callable[[dict[str, str]], bool], q: dict[str, str]) -> None:
        emu = self.emu
        watcher = _Watcher(namespace=ns, matches=matches,
                           bookmarks=q.get("allowWatchBookmarks") in ("true", "1"))
        rv = q.get("resourceVersion") or ""
        backlog: list[tuple[str, dict[str, Any]]] = []
        gone = False
        with emu._lock:
            if rv in ("", "0"):
                backlog = [
                    ("ADDED", copy.deepcopy(p.obj))
                    for (pns, _), p in emu._pods.items()
                    if (ns is None or pns == ns) and matches(p.obj["metadata"].get("labels") or {})
                ]
            elif int(rv) < emu._history_floor:
                gone = True
            else:
                backlog = [
                    (kind, obj)
                    for (erv, ens, kind, obj) in emu._history
                    if erv > int(rv) and (ns is None or ens == ns) and matches(obj["metadata"].get("labels") or {})
                ]
            if not gone:
                emu._watchers.append(watcher)
        self._record(200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        try:
            if gone:
                status = _status(410, "Expired", f"too old resource version: {rv}")
                self._chunk(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                return
            for kind, obj in backlog:
                self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            last_sent = time.monotonic()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = watcher.events.get(timeout=min(left, 0.2, emu.bookmark_interval))
                except queue.Empty:
                    if watcher.bookmarks and time.monotonic() - last_sent >= emu.bookmark_interval:
                        with emu._lock:  # events are queued under this lock: none can be missed
                            if watcher.events.empty():
                                watcher.events.put(("BOOKMARK", _bookmark(emu._rv)))
                    continue
                last_sent = time.monotonic()
                if item is None:
                    break
                kind, obj = item
                if kind == "CUT":  # half an event, then the connection is gone
                    self.wfile.write(b"%x\r\n" % 200 + b'{"type":"MODIFIED","object":{"kind":"Po')
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away
        finally:
            with emu._lock:
                if watcher in emu._watchers:
                    emu._watchers.remove(watcher)
