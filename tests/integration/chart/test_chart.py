"""Checks of ``charts/kcr-trio`` without a cluster.

Templates are rendered by Helm's own engine (``helm-python-sdk`` binds Helm's Go SDK, no ``helm``
binary needed), every manifest is validated against the Kubernetes OpenAPI schemas
(``kubernetes-validate``, strict: unknown fields fail), and A/B mode is checked against what
KubeCodeRun's chart renders (``kubecoderun-internals.md`` §6.1–6.2): its Service selects
``app.kubernetes.io/name`` + ``app.kubernetes.io/instance`` with ``targetPort: http``, its
NetworkPolicy admits ingress from those labels to pods labelled ``managed-by=kubecoderun``, and its
ConfigMap/Secret/ServiceAccount are named after its fullname.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (test extra) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from kcr_trio.backends import kube_pods  # noqa: E402
from kcr_trio.backends.kubernetes_executor import KubernetesSettings  # noqa: E402
from kcr_trio.config import Settings  # noqa: E402

CHART = Path(__file__).resolve().parents[3] / "charts" / "kcr-trio"
K8S_VERSION = "1.32.0"
K8S_VERSIONS = ("1.32.0", "1.37.0")
CRDS = {"ServiceMonitor"}  # not in the core schemas


def render(values: dict[str, Any] | None = None, *, release: str = "trio", namespace: str = "librechat") -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=release, namespace=namespace)
    docs = []
    for text in files.values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def kcr_chart(release: str, chart_name: str = "kubecoderun") -> dict[str, Any]:
    """The parts of KubeCodeRun's rendered chart that A/B mode must fit (§6.1)."""
    fullname = release if chart_name in release else f"{release}-{chart_name}"
    selector = {"app.kubernetes.io/name": chart_name, "app.kubernetes.io/instance": release}
    return {
        "fullname": fullname,
        "service_selector": selector,
        "service_target_port": "http",
        "deployment_selector": selector,
        "netpol_pod_selector": {"app.kubernetes.io/managed-by": "kubecoderun"},
        "netpol_ingress_from": selector,
        "netpol_port": 8080,
        "config": f"{fullname}-config",
        "secret": f"{fullname}-secrets",
        "service_account": fullname,
    }


def validate_all(docs: list[dict[str, Any]]) -> None:
    for d in docs:
        if d["kind"] in CRDS:
            assert d["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


AB_VALUES = {"abMode": {"enabled": True, "kcrRelease": "kcr"}}
FULL_VALUES = {
    "autoscaling": {"enabled": True, "podsMetric": {"name": "kcr_executions_in_flight", "averageValue": "3"}},
    "preStop": {"mode": "exec", "seconds": 15},
    "metrics": {"serviceMonitor": {"enabled": True}},
    "execution": {"namespace": "sandboxes", "networkPolicy": {"denyEgress": False},
                  "languages": {"py": {"poolSize": 4, "image": "reg/py:1",
                                       "resources": {"limits": {"memory": "1Gi"}}}}},
    "api": {"apiKey": "a-very-long-test-api-key"},
    "redis": {"existingSecret": "redis-creds"},
}


RUNNER_VALUES = {"execution": {"protocol": "kcr-runner", "imageRegistry": "aronmuon/kubecoderun", "imageTag": "3.3.3"}}


def executor_verbs() -> set[str]:
    """The RBAC verbs on pods that the Kubernetes adapter's calls need, read from its source so a
    new call without a Role change fails this test."""
    import re

    from kcr_trio.backends import kube_adapter

    source = Path(kube_adapter.__file__).read_text()
    calls = set(re.findall(r"self\._core\.(\w+)", source))
    verbs = {"create_namespaced_pod": {"create"}, "delete_namespaced_pod": {"delete"},
             "read_namespaced_pod": {"get"}, "read_namespaced_pod_log": {"get pods/log"},
             "list_namespaced_pod": {"list"} | ({"watch"} if '"watch": True' in source else set())}
    assert calls <= set(verbs), calls - set(verbs)
    return set().union(*(verbs[c] for c in calls))


@pytest.mark.parametrize("values", [{}, FULL_VALUES, AB_VALUES, RUNNER_VALUES,
                                    {**AB_VALUES, "preStop": {"mode": "none"}}],
                         ids=["default", "everything", "ab", "runner", "ab-no-prestop"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_template_renders_and_validates(values, version):
    docs = render(values)
    assert docs
    for d in docs:
        if d["kind"] not in CRDS:
            kubernetes_validate.validate(d, version, strict=True)
    for d in docs:
        assert d["metadata"]["name"]


def test_lint_is_clean():
    result = helm.lint(str(CHART))
    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] > 1], result["messages"]


def test_default_install_has_everything_standalone_needs():
    kinds = by_kind(render())
    for kind in ("Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
                 "ConfigMap", "Secret", "PodDisruptionBudget"):
        assert kind in kinds, kind
    assert "HorizontalPodAutoscaler" not in kinds and "ServiceMonitor" not in kinds
    (dep,) = kinds["Deployment"]
    (svc,) = kinds["Service"]
    pod = dep["spec"]["template"]
    assert selects(svc["spec"]["selector"], pod["metadata"]["labels"])
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    (api,) = pod["spec"]["containers"]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in api["ports"]
    assert api["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e for e in api["env"]}
    assert env["KCR_POD_OWNER_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["spec"]["serviceAccountName"] == kinds["ServiceAccount"][0]["metadata"]["name"]
    # RBAC: exactly what the executor calls, bound to our service account.
    (role,) = kinds["Role"]
    rules = {tuple(r["resources"]): set(r["verbs"]) for r in role["rules"]}
    assert rules == {("pods",): executor_verbs()}
    (binding,) = kinds["RoleBinding"]
    assert binding["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]
    # Execution pods: ingress only from our API pods, on the sidecar port; no egress.
    (netpol,) = kinds["NetworkPolicy"]
    assert netpol["spec"]["egress"] == [] and set(netpol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = netpol["spec"]["ingress"]
    assert selects(rule["from"][0]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    (pdb,) = kinds["PodDisruptionBudget"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])


def _config_env(kinds: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for cm in kinds["ConfigMap"]:
        env.update(cm["data"])
    return env


def test_config_is_what_the_server_reads(monkeypatch):
    kinds = by_kind(render(FULL_VALUES))
    env = _config_env(kinds)
    assert env["KCR_EXECUTOR"] == "kubernetes"
    assert env["KCR_SESSION_STORE"] == "redis" and env["KCR_FILE_STORE"] == "s3"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings(_env_file=None)
    ks = KubernetesSettings(_env_file=None)
    assert settings.kcr_executor == "kubernetes"
    assert settings.pool_size("py") == 4 and settings.pool_size("js") == 1
    assert ks.execution_namespace() == "sandboxes"
    assert ks.image("py") == "reg/py:1"
    assert ks.resources("py")["limits"]["memory"] == "1Gi"
    assert ks.image("js") == "ghcr.io/kcr-trio/kcr-trio-sidecar-javascript:0.1.0"
    # A separate execution namespace: ingress from our namespace only, and an owner-check role
    # in ours for the crashed-replica sweep.
    (netpol,) = kinds["NetworkPolicy"]
    assert netpol["metadata"]["namespace"] == "sandboxes"
    assert netpol["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "librechat"}
    roles = {r["metadata"].get("namespace", "librechat"): r for r in kinds["Role"]}
    assert set(roles) == {"sandboxes", "librechat"}
    # Secrets: the named existing one plus ours for what it lacks.
    (dep,) = kinds["Deployment"]
    refs = [e.get("secretRef", {}).get("name") for e in dep["spec"]["template"]["spec"]["containers"][0]["envFrom"]]
    assert "redis-creds" in refs and "trio-kcr-trio-secrets" in refs
    assert "REDIS_URL" not in kinds["Secret"][0]["stringData"]


@pytest.mark.parametrize("release", ["kcr", "kubecoderun", "prod-kubecoderun-eu"])
def test_ab_mode_joins_the_kubecoderun_release(release):
    docs = render({"abMode": {"enabled": True, "kcrRelease": release}}, release="trio-ab")
    kinds = by_kind(docs)
    kcr = kcr_chart(release)
    # Nothing that KubeCodeRun's release already provides.
    for kind in ("Service", "ServiceAccount", "Role", "RoleBinding", "Secret"):
        assert kind not in kinds, kind
    (dep,) = kinds["Deployment"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    # 1. Behind KubeCodeRun's Service, and admitted by its execution-pod NetworkPolicy.
    assert selects(kcr["service_selector"], labels)
    assert selects(kcr["netpol_ingress_from"], labels)
    # 2. A container port named http, readiness on /ready.
    (api,) = pod["spec"]["containers"]
    assert any(p["name"] == "http" for p in api["ports"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    # 3. Our own Deployment selector: KubeCodeRun's Deployment does not own our ReplicaSets' pods
    #    by selector alone, and ours never selects KubeCodeRun's pods.
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel["kubecoderun.io/variant"] == "trio" and selects(sel, labels)
    kcr_pod_labels = dict(kcr["deployment_selector"])
    assert not selects(sel, kcr_pod_labels)
    # 4. Same configuration: KubeCodeRun's ConfigMap and Secret, then our KCR_* layer.
    env_from = api["envFrom"]
    assert env_from[0] == {"configMapRef": {"name": kcr["config"]}}
    assert env_from[1] == {"secretRef": {"name": kcr["secret"]}}
    (ours,) = kinds["ConfigMap"]
    assert env_from[-1] == {"configMapRef": {"name": ours["metadata"]["name"]}}
    assert ours["data"]["KCR_EXECUTOR"] == "kubernetes" and ours["data"]["KCR_POD_PROTOCOL"] == "kcr-runner"
    assert not any(k.startswith(("POD_POOL_", "K8S_", "REDIS_", "MINIO_")) for k in ours["data"])
    # 5. KubeCodeRun's service account (bound to its executor Role).
    assert pod["spec"]["serviceAccountName"] == kcr["service_account"]
    # PDB and our NetworkPolicy only ever select Trio pods.
    (pdb,) = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"]["kubecoderun.io/variant"] == "trio"
    (netpol,) = kinds["NetworkPolicy"]
    assert netpol["spec"]["podSelector"]["matchLabels"]["kubecoderun.io/variant"] == "trio"


def test_ab_mode_with_existing_secrets_and_own_images():
    docs = render({"abMode": {"enabled": True, "kcrRelease": "kcr", "podProtocol": "kcr-trio",
                              "existingSecrets": ["api-keys", "redis-creds"]}})
    kinds = by_kind(docs)
    (dep,) = kinds["Deployment"]
    refs = [e for e in dep["spec"]["template"]["spec"]["containers"][0]["envFrom"] if "secretRef" in e]
    assert [r["secretRef"]["name"] for r in refs] == ["api-keys", "redis-creds"]
    data = kinds["ConfigMap"][0]["data"]
    assert data["KCR_POD_PROTOCOL"] == "kcr-trio"
    assert data["K8S_IMAGE_REGISTRY"] == "ghcr.io/kcr-trio/kcr-trio-sidecar"


def test_ab_mode_requires_the_release_name():
    with pytest.raises(Exception, match="kcrRelease"):
        render({"abMode": {"enabled": True}})


@pytest.mark.parametrize("protocol", ["kcr-trio", "kcr-runner"])
@pytest.mark.parametrize("lang", ["py", "ts", "cpp"])
def test_execution_pods_fit_both_charts(protocol, lang):
    """The executor's pod manifest is a valid Pod, is isolated by KubeCodeRun's NetworkPolicy
    and ours, and is never selected by either API Service."""
    template = kube_pods.PodTemplate(
        protocol=protocol, owner_uid="0b9c3f7e-0000-4000-8000-000000000001",
        image_pull_secrets=("regcred",), runtime_class_name="gvisor",
        node_selector=(("pool", "sandbox"),),
        tolerations_json='[{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}]',
    )
    pod = kube_pods.pod_manifest(template, name=f"trio-pool-{lang}-abcd1234", language=lang,
                                 image="reg/x:1", resources={"limits": {"cpu": "1", "memory": "512Mi"}})
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    labels = pod["metadata"]["labels"]
    kcr = kcr_chart("kcr")
    assert selects(kcr["netpol_pod_selector"], labels)
    assert not selects(kcr["service_selector"], labels)
    for docs in (render(), render(AB_VALUES)):
        kinds = by_kind(docs)
        (netpol,) = kinds["NetworkPolicy"]
        assert selects(netpol["spec"]["podSelector"]["matchLabels"], labels)
        for svc in kinds.get("Service", []):
            assert not selects(svc["spec"]["selector"], labels)
    main = pod["spec"]["containers"][0]
    if protocol == "kcr-runner":
        assert "env" not in main
        assert main.get("args") == ([f"LANGUAGE={lang}", "/usr/local/bin/runner"] if lang in ("ts", "cpp") else None)
    else:
        assert {"name": "LANGUAGE", "value": lang} in main["env"]


@pytest.mark.parametrize("values", [{}, AB_VALUES, RUNNER_VALUES], ids=["standalone", "ab", "runner"])
def test_readiness_and_rollout_settings(values):
    kinds = by_kind(render(values))
    (dep,) = kinds["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (api,) = spec["containers"]
    # Keeps serving while endpoints are withdrawn, then drains in-flight runs within the grace period.
    assert api["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    assert spec["terminationGracePeriodSeconds"] >= 10 + 30 + 10
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = _config_env(kinds)
    assert env["KCR_POD_START_TIMEOUT"] == "600" and env["KCR_POD_READY_TIMEOUT"] == "120"
    assert env["KCR_RUNNER_MAX_EXECUTION_TIME"] == "120"
    for k in ("KCR_POD_START_TIMEOUT", "KCR_POD_READY_TIMEOUT", "KCR_RUNNER_MAX_EXECUTION_TIME"):
        assert k.lower() in KubernetesSettings.model_fields


def test_prestop_exec_mode_and_metric_based_autoscaling():
    kinds = by_kind(render(FULL_VALUES))
    (api,) = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert api["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "15"]}}
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"] == {"metric": {"name": "kcr_executions_in_flight"},
                                       "target": {"type": "AverageValue", "averageValue": "3"}}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    only_metric = by_kind(render({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None,
                                                  "podsMetric": {"name": "kcr_executions_in_flight"}}}))
    (hpa,) = only_metric["HorizontalPodAutoscaler"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    validate_all(list(only_metric["HorizontalPodAutoscaler"]))
    with pytest.raises(Exception, match="preStop.mode"):
        render({"preStop": {"mode": "wait"}})


def test_owner_check_role_in_a_separate_execution_namespace_only_lists():
    kinds = by_kind(render(FULL_VALUES))
    roles = {r["metadata"].get("namespace", "librechat"): r for r in kinds["Role"]}
    assert {tuple(r["resources"]): set(r["verbs"]) for r in roles["sandboxes"]["rules"]} == {("pods",): executor_verbs()}
    assert roles["librechat"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
