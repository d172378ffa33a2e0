"""Container mode of the Kubernetes emulator: how a pod spec becomes `podman run` arguments (pure;
the containers themselves are exercised in tests/integration/images)."""

from __future__ import annotations

import pytest

from kcr_trio.backends import kube_pods
from tests.support.container_pod import PodSpecError, pod_spec, quantity, run_argv


def _flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_an_executor_pod_maps_to_a_locked_down_container():
    pod = kube_pods.pod_manifest(kube_pods.PodTemplate(), name="trio-pool-py-x", language="py", image="img:1",
                                 resources={"limits": {"cpu": "500m", "memory": "256Mi"}})
    argv, port = run_argv(pod, name="c1", labels={"k": "v"})
    assert port == 8080
    assert argv[:3] == ["run", "-d", "--name"] and "--pull" in argv
    assert _flag_values(argv, "--network") == ["none"]
    assert _flag_values(argv, "--user") == ["65532:65532"]
    assert _flag_values(argv, "--group-add") == ["65532"]
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv
    assert _flag_values(argv, "--security-opt") == ["no-new-privileges"]
    assert _flag_values(argv, "--cap-drop") == ["all"]
    tmpfs = {t.split(":")[0]: t.split(":")[1].split(",") for t in _flag_values(argv, "--tmpfs")}
    assert set(tmpfs) == {"/mnt/data", "/tmp"}
    assert "exec" in tmpfs["/tmp"] and f"size={2**30}" in tmpfs["/mnt/data"]
    assert "LANGUAGE=py" in _flag_values(argv, "--env") and "SIDECAR_PORT=8080" in _flag_values(argv, "--env")
    assert _flag_values(argv, "--memory") == [str(256 * 2**20)] and _flag_values(argv, "--cpus") == ["0.5"]
    assert _flag_values(argv, "--label") == ["k=v"]
    assert argv[-1] == "img:1"  # no args: the image's entrypoint and cmd


def test_command_and_args_replace_entrypoint_and_cmd():
    pod = pod_spec("img")
    pod["spec"]["containers"][0].update(command=["python", "-m", "x"], args=["--flag", 3])
    argv, _ = run_argv(pod, name="c")
    assert _flag_values(argv, "--entrypoint") == ['["python", "-m", "x"]']
    assert argv[-3:] == ["img", "--flag", "3"]


def test_run_as_non_root_is_checked_like_the_kubelet():
    pod = pod_spec("img")
    del pod["spec"]["securityContext"]["runAsUser"]
    with pytest.raises(PodSpecError, match="non-numeric user"):
        run_argv(pod, name="c", image_user_of=lambda image: "")
    with pytest.raises(PodSpecError, match="run as root"):
        run_argv(pod, name="c", image_user_of=lambda image: "0:0")
    argv, _ = run_argv(pod, name="c", image_user_of=lambda image: "65532:65532")
    assert "--user" not in argv  # the image's own (non-root) user runs


@pytest.mark.parametrize("change", [
    lambda c, s: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}) or c["volumeMounts"].append(
        {"name": "host", "mountPath": "/host"}),
    lambda c, s: c["env"].append({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    lambda c, s: c["volumeMounts"].append({"name": "missing", "mountPath": "/m"}),
    lambda c, s: c["securityContext"].update(seccompProfile={"type": "Localhost"}),
])
def test_what_cannot_be_honoured_is_refused(change):
    pod = pod_spec("img")
    change(pod["spec"]["containers"][0], pod["spec"])
    with pytest.raises(PodSpecError):
        run_argv(pod, name="c")


def test_quantities():
    assert quantity("512Mi") == 512 * 2**20 and quantity("1Gi") == 2**30
    assert quantity("500m") == 0.5 and quantity("2") == 2 and quantity("1k") == 1000
    with pytest.raises(PodSpecError):
        quantity("12Xi")
