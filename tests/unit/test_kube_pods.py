"""Pure logic of the Kubernetes executor: pod manifests, pod-status reading, settings parsing,
and the emulator's label-selector parser."""

from __future__ import annotations

import pytest

from kcr_trio.backends import kube_pods
from kcr_trio.backends.kubernetes_executor import KubernetesSettings
from tests.support.kube_emulator import parse_selector


def _pod(status: dict, memory: str = "512Mi") -> dict:
    return {
        "metadata": {"name": "trio-pool-py-x"},
        "spec": {"containers": [{"name": "main", "resources": {"limits": {"memory": memory}}}]},
        "status": status,
    }


def test_manifest_security_and_labels():
    t = kube_pods.PodTemplate(owner_uid="uid-1", runtime_class_name="gvisor", image_pull_secrets=("a", "b"),
                              node_selector=(("k", "v"),), tolerations_json='[{"key": "x", "operator": "Exists"}]')
    m = kube_pods.pod_manifest(t, name="trio-pool-py-1", language="py", image="img", resources={})
    labels = m["metadata"]["labels"]
    assert labels[kube_pods.OWNER] == "uid-1" and labels[kube_pods.TYPE] == "pool"
    assert "app.kubernetes.io/instance" not in labels
    spec = m["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert spec["runtimeClassName"] == "gvisor" and spec["nodeSelector"] == {"k": "v"}
    assert spec["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
    assert spec["tolerations"] == [{"key": "x", "operator": "Exists"}]
    sc = spec["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532


def test_runner_protocol_fixes_ts_and_cpp_only():
    t = kube_pods.PodTemplate(protocol="kcr-runner")
    for lang, args in (("ts", ["LANGUAGE=ts", "/usr/local/bin/runner"]), ("cpp", ["LANGUAGE=cpp", "/usr/local/bin/runner"]),
                       ("py", None), ("c", None)):
        c = kube_pods.pod_manifest(t, name="n", language=lang, image="i", resources={})["spec"]["containers"][0]
        assert c.get("args") == args and "env" not in c


def test_status_reading():
    assert kube_pods.view(_pod({"phase": "Pending"})).failure is None
    running = {"phase": "Running", "podIP": "10.0.0.5",
               "conditions": [{"type": "Ready", "status": "True"}],
               "containerStatuses": [{"name": "main", "ready": True, "state": {"running": {}}}]}
    v = kube_pods.view(_pod(running))
    assert v.ready and v.ip == "10.0.0.5" and v.failure is None
    oom = kube_pods.view(_pod({"phase": "Failed", "containerStatuses": [
        {"name": "main", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}, "256Mi"))
    assert not oom.ready and "OOMKilled" in oom.failure and "256Mi" in oom.failure and oom.exit_code == 137
    killed = kube_pods.view(_pod({"phase": "Failed", "containerStatuses": [
        {"name": "main", "state": {"terminated": {"reason": "Error", "exitCode": 137}}}]}))
    assert "killed by signal 9" in killed.failure
    evicted = kube_pods.view(_pod({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}))
    assert "evicted" in evicted.failure and "low on memory" in evicted.failure
    pull = kube_pods.view(_pod({"phase": "Pending", "containerStatuses": [
        {"name": "main", "state": {"waiting": {"reason": "ErrImagePull", "message": 'failed to pull "x": not found'}}}]}))
    assert "could not be pulled" in pull.failure and "ErrImagePull" in pull.failure
    # A pull error the kubelet keeps retrying (registry hiccup) is a wait with a reason, not a failure.
    retrying = kube_pods.view(_pod({"phase": "Pending", "containerStatuses": [
        {"name": "main", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off"}}}]}))
    assert retrying.failure is None and not retrying.started and "ImagePullBackOff" in retrying.waiting
    unschedulable = kube_pods.view(_pod({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes: Insufficient cpu"}]}))
    assert unschedulable.failure is None and "Insufficient cpu" in unschedulable.waiting
    assert v.started and not unschedulable.started
    creating = kube_pods.view(_pod({"phase": "Pending", "containerStatuses": [
        {"name": "main", "state": {"waiting": {"reason": "ContainerCreating"}}}]}))
    assert creating.failure is None


def test_node_selector_and_tolerations_parsing():
    assert kube_pods.parse_node_selector('{"a": "b"}') == (("a", "b"),)
    assert kube_pods.parse_node_selector("a=b, c=d") == (("a", "b"), ("c", "d"))
    assert kube_pods.parse_node_selector("") == ()
    with pytest.raises(ValueError):
        kube_pods.parse_node_selector("nonsense")
    with pytest.raises(ValueError):
        kube_pods.check_tolerations('{"key": "x"}')
    assert kube_pods.check_tolerations("") == ""


def test_settings_per_language(monkeypatch):
    monkeypatch.setenv("LANG_IMAGE_PY", "reg/py:9")
    monkeypatch.setenv("LANG_MEMORY_LIMIT_JS", "1Gi")
    ks = KubernetesSettings(_env_file=None, k8s_image_registry="r/kcr", k8s_image_tag="3")
    assert ks.image("py") == "reg/py:9"
    assert ks.image("cpp") == "r/kcr-c-cpp:3" and ks.image("f90") == "r/kcr-fortran:3"
    assert ks.resources("js")["limits"]["memory"] == "1Gi"
    assert ks.resources("py")["limits"]["memory"] == "512Mi"
    assert not KubernetesSettings(_env_file=None, kcr_pod_protocol="kcr-runner").supports("bash")


@pytest.mark.parametrize(
    "selector,labels,expected",
    [
        ("a=b", {"a": "b"}, True),
        ("a==b,c", {"a": "b"}, False),
        ("a!=b", {}, True),
        ("a in (x, y),!z", {"a": "y"}, True),
        ("a notin (x)", {"a": "x"}, False),
        ("a", {"a": ""}, True),
        ("", {"q": "1"}, True),
    ],
)
def test_emulator_label_selectors(selector, labels, expected):
    assert parse_selector(selector)(labels) is expected


def test_our_pods_have_a_read_only_root_with_writable_data_and_tmp():
    c_ours = kube_pods.pod_manifest(kube_pods.PodTemplate(), name="n", language="py", image="i", resources={})
    main = c_ours["spec"]["containers"][0]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts == {"/mnt/data": "data", "/tmp": "tmp"}
    assert {v["name"] for v in c_ours["spec"]["volumes"] if "emptyDir" in v} == {"data", "tmp"}
    # KubeCodeRun's runner images are not ours to change: their pods stay as they were.
    runner = kube_pods.pod_manifest(kube_pods.PodTemplate(protocol="kcr-runner"), name="n", language="py",
                                    image="i", resources={})["spec"]["containers"][0]
    assert "readOnlyRootFilesystem" not in runner["securityContext"] and len(runner["volumeMounts"]) == 1
