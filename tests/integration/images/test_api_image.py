"""The API server image, run the way the Helm chart runs it: uid 65532, read-only root filesystem,
emptyDirs at /data and /tmp, all capabilities dropped, `args: [serve]`, probes from values.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import containers
from tests.support.container_pod import RunningContainer, pod_spec

from .conftest import wait_ready

CHART = Path(__file__).resolve().parents[3] / "charts" / "kcr-trio"
pytestmark = pytest.mark.integration


def test_api_image_metadata_matches_the_chart(core_images: str) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    # The chart's default image is the name build-images.sh gives the API image.
    assert f"{values['image']['repository']}:{chart['appVersion']}" == containers.API_IMAGE
    assert values["execution"]["imageRegistry"] + "-python:" + chart["appVersion"] == containers.sidecar_image("python")
    cfg = json.loads(containers.podman("image", "inspect", containers.API_IMAGE).stdout)[0]["Config"]
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["kcr-trio"] and cfg["Cmd"] == ["serve"]
    assert f"{values['containerPort']}/tcp" in cfg["ExposedPorts"]


def test_api_image_has_the_prod_extras(core_images: str) -> None:
    probe = containers.podman(
        "run", "--rm", "--network", "none", *containers.ULIMITS, "--entrypoint", "python",
        containers.API_IMAGE, "-c", "import redis, kubernetes, trio_asyncio, miniopy_async, kcr_trio; print('ok')",
        check=False)
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr


def test_api_image_serves_with_a_read_only_root_and_the_charts_probes(core_images: str) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    env = {"API_KEY": "smoke-test-key-0123456789abcdef", "KCR_UNSANDBOXED_TRUSTED": "true",
           "POD_POOL_PY": "1", "POD_POOL_JS": "0", "POD_POOL_BASH": "0"}
    spec = pod_spec(containers.API_IMAGE, env=env, port=values["containerPort"],
                    mounts={"data": "/data", "tmp": "/tmp"})
    spec["spec"]["containers"][0]["args"] = ["serve"]
    with RunningContainer(spec) as c:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = values[probe]["httpGet"]["path"]
            assert values[probe]["httpGet"]["port"] == "http"  # the container port, named in the chart
            wait_ready(c, path, timeout=90)
        r = httpx.post(c.url + "/exec", headers={"X-API-Key": env["API_KEY"]}, timeout=60,
                       json={"lang": "py", "code": "import os; print(6 * 7, os.getuid())"})
        assert r.status_code == 200, r.text
        assert r.json()["stdout"].strip() == "42 65532"
        # Only the emptyDirs were writable: the data dir holds the server's files.
        assert c.exec("touch", "/opt/venv/x").returncode != 0
        assert c.exec("ls", "/data").returncode == 0
