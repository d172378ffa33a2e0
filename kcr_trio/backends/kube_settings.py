"""Settings of the Kubernetes executor: KubeCodeRun's variable names where they exist (one
ConfigMap serves both in an A/B rollout), ours with the ``KCR_`` prefix, and the per-language
``LANG_<KIND>_<L>`` overrides KubeCodeRun reads (image, CPU and memory per language)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kcr_trio.core.languages import LANGUAGES

from . import kube_pods
from .kube_adapter import default_namespace

__all__ = ["KubernetesSettings"]


class KubernetesSettings(BaseSettings):
    """Kubernetes executor settings; names are KubeCodeRun's where they exist, ours are ``KCR_``."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="allow"
    )

    k8s_namespace: str = ""  # where execution pods run; "" → POD_NAMESPACE/NAMESPACE → SA → default
    pod_namespace: str = ""  # our own namespace (downward API)
    namespace: str = ""  # KubeCodeRun's alternative name for the same
    kubeconfig: str = ""  # KUBECONFIG; in-cluster config is used when running in a pod without it
    k8s_image_registry: str = "aronmuon/kubecoderun"
    k8s_image_tag: str = "latest"
    k8s_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    k8s_image_pull_secrets: str = ""  # comma-separated secret names
    k8s_runtime_class_name: str = ""
    k8s_pod_node_selector: str = ""  # JSON object (or k=v,k2=v2)
    k8s_pod_tolerations: str = ""  # JSON list
    k8s_seccomp_profile_type: str = "RuntimeDefault"
    k8s_cpu_limit: str = "1"
    k8s_memory_limit: str = "512Mi"
    k8s_cpu_request: str = "100m"
    k8s_memory_request: str = "128Mi"

    kcr_pod_owner_uid: str = ""  # our API pod's UID (downward API); random when unset
    kcr_pod_name_prefix: str = "trio-pool"
    kcr_pod_protocol: Literal["kcr-trio", "kcr-runner"] = "kcr-trio"
    kcr_sidecar_port: int = Field(8080, ge=1, le=65535)
    # MAX_EXECUTION_TIME the KubeCodeRun runner images were built with (they clamp to it silently).
    kcr_runner_max_execution_time: float = Field(120.0, gt=0)
    kcr_cold_pod_fallback: bool = False
    kcr_cold_pod_max: int = Field(4, ge=1)  # cold pods starting at once
    # Creation → container started: scheduling (an autoscaler adding a node) and the image pull (a
    # first pull of a multi-GB image takes minutes). Pull errors the kubelet retries and an
    # Unschedulable pod are waited on, with their reason shown, until this passes.
    kcr_pod_start_timeout: float = Field(600.0, gt=0)
    kcr_pod_ready_timeout: float = Field(120.0, gt=0)  # container started → Ready, else replaced
    kcr_pod_delete_grace: int = Field(1, ge=0)  # gracePeriodSeconds when deleting a used pod
    kcr_pod_create_parallel: int = Field(5, ge=1)  # pods starting at once per language
    kcr_k8s_request_timeout: float = Field(15.0, gt=0)  # read timeout of one API call
    kcr_k8s_cleanup_timeout: float = Field(10.0, gt=0)  # bound on shielded deletes
    kcr_pod_sweep_orphans: bool = True

    def lang_value(self, kind: str, language: str) -> str | None:
        """``LANG_<KIND>_<L>`` (e.g. ``LANG_IMAGE_PY``): one setting per language, so they are not
        declared fields; read from init arguments / ``.env`` extras, then the environment."""
        key = f"LANG_{kind}_{LANGUAGES[language].env_suffix}".upper()
        extra = {k.upper(): v for k, v in (self.model_extra or {}).items()}
        value = extra.get(key)
        if value in (None, ""):
            value = next((v for k, v in os.environ.items() if k.upper() == key), None)
        return str(value) if value not in (None, "") else None

    def image(self, language: str) -> str:
        return self.lang_value("image", language) or (
            f"{self.k8s_image_registry}-{kube_pods.IMAGE_SUFFIX[language]}:{self.k8s_image_tag}"
        )

    def resources(self, language: str) -> dict[str, dict[str, str]]:
        return {
            "limits": {
                "cpu": self.lang_value("cpu_limit", language) or self.k8s_cpu_limit,
                "memory": self.lang_value("memory_limit", language) or self.k8s_memory_limit,
            },
            "requests": {
                "cpu": self.lang_value("cpu_request", language) or self.k8s_cpu_request,
                "memory": self.lang_value("memory_request", language) or self.k8s_memory_request,
            },
        }

    def execution_namespace(self) -> str:
        return default_namespace(self.k8s_namespace, self.pod_namespace, self.namespace)

    def own_namespace(self) -> str:
        return default_namespace(self.pod_namespace, self.namespace, self.k8s_namespace)

    def supports(self, language: str) -> bool:
        return not (self.kcr_pod_protocol == "kcr-runner" and language in kube_pods.RUNNER_UNSUPPORTED)
