"""Execution-pod manifests and pod-status reading: pure functions, no I/O.

Two pod shapes, chosen by ``KCR_POD_PROTOCOL`` to match the images deployed
(``kubecoderun-internals.md`` §2.3):

* ``kcr-trio`` — our sidecar image: one container ``main`` that reads ``LANGUAGE``,
  ``WORKING_DIR`` and ``SIDECAR_PORT`` from its environment (the 2.1.3 sidecar's env contract).
* ``kcr-runner`` — KubeCodeRun ≥ 3.0 language images with the Go runner baked in: one container,
  no env (the image's ``env -i`` entrypoint would wipe it). The language is baked into the image,
  except that the TypeScript image is built with ``LANGUAGE=js`` and C++ uses the C image with
  ``LANGUAGE=c``; for those two we pass ``args: ["LANGUAGE=<code>", "/usr/local/bin/runner"]``,
  which replaces the image's CMD but keeps its ``env -i`` ENTRYPOINT, so the later assignment wins.

Both are compatible with KubeCodeRun's labels and NetworkPolicy (``managed-by=kubecoderun``, port
8080) and never carry ``app.kubernetes.io/instance`` (which would put them behind the API Service
in an A/B deployment). Security: non-root 65532, no privilege escalation, all capabilities dropped,
RuntimeDefault seccomp, no service-account token, no service links.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MANAGED_BY = "app.kubernetes.io/managed-by"
LANGUAGE = "kubecoderun.io/language"
TYPE = "kubecoderun.io/type"
OWNER = "kubecoderun.io/owner-pod-uid"
VARIANT = "kubecoderun.io/variant"
VARIANT_VALUE = "trio"

# KubeCodeRun's image suffixes: ``{K8S_IMAGE_REGISTRY}-{suffix}:{K8S_IMAGE_TAG}``.
IMAGE_SUFFIX = {
    "py": "python", "js": "javascript", "ts": "typescript", "go": "go", "java": "java",
    "c": "c-cpp", "cpp": "c-cpp", "php": "php", "rs": "rust", "r": "r", "f90": "fortran",
    "d": "d", "bash": "bash",
}
# Languages the Go runner images cannot run (no such image or runner mode).
RUNNER_UNSUPPORTED = frozenset({"bash"})
RUNNER_LANGUAGE_ARGS = {"ts", "cpp"}
RUNNER_BINARY = "/usr/local/bin/runner"


@dataclass(frozen=True)
class PodTemplate:
    """Everything a pod manifest depends on besides its name and language."""

    protocol: str = "kcr-trio"
    owner_uid: str = ""
    port: int = 8080
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    runtime_class_name: str = ""
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations_json: str = ""
    seccomp_profile_type: str = "RuntimeDefault"
    termination_grace_seconds: int = 5
    data_size_limit: str = "1Gi"


def selector(*, owner_uid: str | None = None, language: str | None = None) -> str:
    """Label selector for our execution pods (optionally one owner's, one language's)."""
    parts = [f"{MANAGED_BY}=kubecoderun", f"{VARIANT}={VARIANT_VALUE}"]
    parts.append(f"{OWNER}={owner_uid}" if owner_uid else OWNER)
    if language:
        parts.append(f"{LANGUAGE}={language}")
    return ",".join(parts)


def pod_manifest(
    template: PodTemplate,
    *,
    name: str,
    language: str,
    image: str,
    resources: dict[str, dict[str, str]],
    kind: str = "pool",
) -> dict[str, Any]:
    """The pod for one sandbox of ``language`` (``kind``: ``pool`` for warm pods, ``cold`` for
    on-demand ones)."""
    labels = {
        "app.kubernetes.io/name": "kubecoderun",
        "app.kubernetes.io/component": "execution",
        MANAGED_BY: "kubecoderun",
        LANGUAGE: language,
        TYPE: kind,
        VARIANT: VARIANT_VALUE,
        OWNER: template.owner_uid,
    }
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": template.image_pull_policy,
        "ports": [{"name": "http", "containerPort": template.port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": template.port},
            "periodSeconds": 1,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "data", "mountPath": "/mnt/data"}],
    }
    if template.protocol == "kcr-trio":
        container["env"] = [
            {"name": "LANGUAGE", "value": language},
            {"name": "WORKING_DIR", "value": "/mnt/data"},
            {"name": "SIDECAR_PORT", "value": str(template.port)},
            {"name": "HOME", "value": "/mnt/data"},
        ]
        # Our images write only to /mnt/data and /tmp (per-run temp dirs): the root stays read-only.
        container["securityContext"]["readOnlyRootFilesystem"] = True
        container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
    elif language in RUNNER_LANGUAGE_ARGS:
        container["args"] = [f"LANGUAGE={language}", RUNNER_BINARY]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": template.termination_grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": template.seccomp_profile_type},
        },
        "containers": [container],
        "volumes": [{"name": "data", "emptyDir": {"sizeLimit": template.data_size_limit}}],
    }
    if template.protocol == "kcr-trio":
        spec["volumes"].append({"name": "tmp", "emptyDir": {"sizeLimit": template.data_size_limit}})
    if template.runtime_class_name:
        spec["runtimeClassName"] = template.runtime_class_name
    if template.node_selector:
        spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations_json:
        spec["tolerations"] = json.loads(template.tolerations_json)
    if template.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in template.image_pull_secrets]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec}


# ---------------------------------------------------------------------------------------------
# reading pod status


@dataclass(frozen=True)
class PodView:
    """What the executor needs from a pod object."""

    name: str
    phase: str
    ip: str | None
    ready: bool
    terminating: bool
    failure: str | None  # set when the pod can no longer serve, with a readable reason
    exit_code: int | None
    started: bool = False  # scheduled, image pulled, container started (or finished)
    waiting: str | None = None  # why a pod that may still start is waiting (unschedulable, pull retries)


# Waiting reasons after which a container will not start without outside help.
_FATAL_WAITING = {
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not present and the pull policy is Never",
    "CreateContainerConfigError": "the container configuration is invalid",
    "CreateContainerError": "the container could not be created",
    "RunContainerError": "the container could not be started",
    "CrashLoopBackOff": "the container keeps crashing",
}


# Image pull errors the kubelet keeps retrying (ErrImagePull, then ImagePullBackOff): a registry
# hiccup or rate limit passes, so the pod is given until its start timeout; these messages mean
# the image cannot be pulled however long we wait, so the pod is given up at once.
_PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff")
_PERMANENT_PULL = ("not found", "manifest unknown", "unauthorized", "denied", "forbidden", "no such image",
                   "invalid reference")


def view(pod: dict[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    statuses = status.get("containerStatuses") or []
    main = next((c for c in statuses if c.get("name") == "main"), statuses[0] if statuses else {})
    ready = phase == "Running" and conditions.get("Ready") == "True" and bool(main.get("ready", True))
    state = main.get("state") or {}
    started = phase in ("Running", "Succeeded", "Failed") or "running" in state or "terminated" in state
    failure, exit_code = describe_failure(pod)
    return PodView(
        name=meta.get("name", ""),
        phase=phase,
        ip=status.get("podIP") or None,
        ready=ready and failure is None,
        terminating=bool(meta.get("deletionTimestamp")),
        failure=failure,
        exit_code=exit_code,
        started=started,
        waiting=None if failure or started else describe_waiting(pod),
    )


def describe_waiting(pod: dict[str, Any]) -> str | None:
    """Why a pod that may still start is not running yet, when Kubernetes says more than
    "starting": the scheduler's message, or a pull error the kubelet is retrying."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            why = cond.get("message") or cond.get("reason") or "no node fits"
            return f"Execution pod {name} cannot be scheduled ({cond.get('reason') or 'Pending'}): {why}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _PULL_ERRORS:
            msg = f": {waiting['message']}" if waiting.get("message") else ""
            return f"Execution pod {name} is retrying its image pull ({waiting['reason']}){msg}"
    return None


def describe_failure(pod: dict[str, Any]) -> tuple[str | None, int | None]:
    """A readable reason why this pod cannot (any longer) run code, and the container's exit
    code if it terminated; ``(None, None)`` for a healthy or still-starting pod."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    limits: dict[str, Any] = {}
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == "main":
            limits = (c.get("resources") or {}).get("limits") or {}
    if status.get("reason") == "Evicted":
        msg = status.get("message") or "node resource pressure"
        return f"Execution pod {name} was evicted by Kubernetes: {msg}", None
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        term = state.get("terminated")
        if term:
            code = term.get("exitCode")
            reason = term.get("reason") or "Error"
            if reason == "OOMKilled":
                limit = limits.get("memory")
                suffix = f" (memory limit {limit})" if limit else ""
                return f"Execution pod {name} ran out of memory and was OOMKilled{suffix}", code
            if code is not None and code > 128:
                how = f"killed by signal {code - 128}"
            else:
                how = f"exit code {code}"
            detail = f": {term['message']}" if term.get("message") else ""
            return f"Execution pod {name} stopped unexpectedly ({reason}, {how}){detail}", code
        waiting = state.get("waiting") or {}
        message = str(waiting.get("message") or "")
        if waiting.get("reason") in _PULL_ERRORS and any(p in message.lower() for p in _PERMANENT_PULL):
            return f"Execution pod {name} cannot start, the image could not be pulled ({waiting['reason']}): {message}", None
        if waiting.get("reason") in _FATAL_WAITING:
            what = _FATAL_WAITING[waiting["reason"]]
            msg = f": {waiting['message']}" if waiting.get("message") else ""
            return f"Execution pod {name} cannot start, {what} ({waiting['reason']}){msg}", None
    if phase in ("Failed", "Succeeded"):
        msg = status.get("message") or status.get("reason") or "no details"
        return f"Execution pod {name} is no longer running ({phase}: {msg})", None
    return None, None


def parse_node_selector(raw: str) -> tuple[tuple[str, str], ...]:
    """``K8S_POD_NODE_SELECTOR``: a JSON object (KubeCodeRun's format) or ``k=v,k2=v2``."""
    raw = raw.strip()
    if not raw:
        return ()
    if raw.startswith("{"):
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"K8S_POD_NODE_SELECTOR is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("K8S_POD_NODE_SELECTOR must be a JSON object")
        return tuple((str(k), str(v)) for k, v in data.items())
    pairs = []
    for item in raw.split(","):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"K8S_POD_NODE_SELECTOR: expected key=value, got {item!r}")
        pairs.append((k.strip(), v.strip()))
    return tuple(pairs)


def check_tolerations(raw: str) -> str:
    """``K8S_POD_TOLERATIONS``: a JSON list of toleration objects; returned normalised."""
    raw = raw.strip()
    if not raw:
        return ""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"K8S_POD_TOLERATIONS is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ValueError("K8S_POD_TOLERATIONS must be a JSON list of objects")
    return json.dumps(data)
