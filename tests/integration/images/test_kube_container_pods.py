"""The Kubernetes executor against the emulator in container mode: every execution pod is a podman
container of the pod spec's image (the py image build-images.sh made), with the pod's user,
read-only root, emptyDirs as tmpfs, env, and no network but the sidecar port. Pool, exec, cancel
and timeout behave as with process pods — and now a wrong USER, missing toolchain, unwritable path
or wrong entrypoint in the image would fail here instead of on a cluster."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.kubernetes.conftest import NS, executor_for, ready_pods, until
from tests.support import containers
from tests.support.container_pod import LABEL, ContainerPods
from tests.support.kube_emulator import KubeEmulator

pytestmark = pytest.mark.integration

IMAGES = {"k8s_image_registry": f"{containers.REGISTRY}/kcr-trio-sidecar", "k8s_image_tag": containers.TAG}
LONG = "import time\nopen('started.txt', 'w').close()\ntime.sleep(60)\n"


@pytest.fixture
def pods(core_images: str) -> Iterator[ContainerPods]:
    launcher = ContainerPods()
    yield launcher
    leftovers = launcher.cleanup()
    assert not leftovers, f"containers outlived their pods: {leftovers}"


@pytest.fixture
def emulator(pods: ContainerPods, tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path / "cluster", namespaces=(NS,), pod_command=pods) as emu:
        yield emu


@pytest.fixture
def kubeconfig(emulator: KubeEmulator, tmp_path: Path) -> Path:
    return emulator.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)


def running_containers(pods: ContainerPods) -> dict[str, dict]:
    """This emulator's containers that podman still lists (running or not yet removed)."""
    names = containers.podman("ps", "-a", "--filter", f"label={LABEL}={pods.instance}", "--format",
                              "{{.Names}}").stdout.split()
    found = {}
    for name in names:
        inspected = containers.podman("inspect", name, check=False)
        if inspected.returncode == 0:
            found[name] = json.loads(inspected.stdout)[0]
    return found


def file_in_pod(pods: ContainerPods, pod_name: str, path: str) -> bool:
    name = pods.container_name(NS, pod_name)
    return containers.podman("exec", name, "test", "-e", path, check=False).returncode == 0


async def test_pool_pods_are_containers_of_the_image(emulator, kubeconfig, pods):
    async with executor_for(kubeconfig, {"py": 2}, **IMAGES) as ex:
        assert await ex.wait_warm(120)
        live = running_containers(pods)
        assert len(live) == 2
        for c in live.values():
            assert c["ImageName"] == containers.sidecar_image("python")
            assert c["Config"]["User"] == "65532:65532"
            assert c["HostConfig"]["ReadonlyRootfs"] is True
            assert c["HostConfig"]["NetworkMode"] == "none"
            assert "LANGUAGE=py" in c["Config"]["Env"]
            assert {"/mnt/data", "/tmp"} <= set(c["HostConfig"]["Tmpfs"])
        names = []
        for i in range(2):
            async with ex.sandbox("py", wait=60) as sb:
                names.append(sb.pod_name)
                r = await sb.run(f"import os\nprint(6 * 7 + {i}, os.getuid())", timeout=20, request_id=f"r{i}")
                assert r.failure is None, r.stderr
                assert r.stdout.split() == [str(42 + i), "65532"]
            await until(lambda n=sb.pod_name: emulator.pod(NS, n) is None, 30, "used pod deleted")
            await until(lambda n=sb.pod_name: pods.container_name(NS, n) not in running_containers(pods), 30,
                        "container of the used pod gone")
        assert names[0] != names[1]
        await until(lambda: len(ready_pods(emulator, "py")) == 2, 120, "pool refilled")
    await until(lambda: not emulator.pods(NS, "kubecoderun.io/variant=trio"), 30, "pods deleted at shutdown")
    await until(lambda: not running_containers(pods), 30, "containers gone at shutdown")


async def test_exec_with_input_and_output_files(emulator, kubeconfig, pods):
    async def chunks():
        yield b"1,2\n3,4\n"

    async with executor_for(kubeconfig, {"py": 1}, **IMAGES) as ex:
        assert await ex.wait_warm(120)
        async with ex.sandbox("py", wait=60) as sb:
            await sb.put_file("in.csv", chunks())
            code = ("import csv\nrows = list(csv.reader(open('in.csv')))\nprint('hello', len(rows))\n"
                    "open('/mnt/data/out.txt', 'w').write('sum=%d' % sum(int(x) for r in rows for x in r))\n")
            r = await sb.run(code, timeout=20, request_id="files")
            assert r.failure is None and r.exit_code == 0, r.stderr
            assert r.stdout.strip() == "hello 2"
            generated = {g.name: g for g in await sb.generated_files()}
            assert "out.txt" in generated and "in.csv" not in generated
            async with sb.open_file("out.txt") as body:
                data = b"".join([chunk async for chunk in body])
            assert data == b"sum=10"


async def test_client_disconnect_kills_the_container(emulator, kubeconfig, pods):
    async with executor_for(kubeconfig, {"py": 1}, **IMAGES) as ex:
        assert await ex.wait_warm(120)
        cancelled_at = 0.0
        with trio.CancelScope() as request:
            async with ex.sandbox("py", wait=60) as sb:
                name = sb.pod_name

                async def disconnect_once_running() -> None:
                    nonlocal cancelled_at
                    await until(lambda: file_in_pod(pods, name, "/mnt/data/started.txt"), 30, "program running")
                    cancelled_at = time.monotonic()
                    request.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(disconnect_once_running)
                    await sb.run(LONG, timeout=60, request_id="gone")
        assert request.cancelled_caught
        await until(lambda: emulator.pod(NS, name) is None, 15, "pod deleted after disconnect")
        assert time.monotonic() - cancelled_at < 15
        await until(lambda: pods.container_name(NS, name) not in running_containers(pods), 15, "container gone")
        await until(lambda: len(ready_pods(emulator, "py")) == 1, 120, "pool refilled")


async def test_timeout_stops_the_program_and_the_pod_is_not_reused(emulator, kubeconfig, pods):
    async with executor_for(kubeconfig, {"py": 1}, **IMAGES) as ex:
        assert await ex.wait_warm(120)
        async with ex.sandbox("py", wait=60) as sb:
            name = sb.pod_name
            started = time.monotonic()
            r = await sb.run("import time\nprint('start', flush=True)\ntime.sleep(60)\n", timeout=2, request_id="slow")
            took = time.monotonic() - started
        assert r.timed_out and r.failure is None, r
        assert r.stdout.strip() == "start"
        assert took < 20
        await until(lambda: emulator.pod(NS, name) is None, 30, "timed-out pod deleted")
        async with ex.sandbox("py", wait=120) as sb2:
            assert sb2.pod_name != name
            assert (await sb2.run("print('fine')", timeout=20, request_id="after")).stdout.strip() == "fine"


@pytest.mark.parametrize(("lang", "code"), [
    ("js", "console.log('hello', process.getuid());"),
    ("ts", "const n: number = process.getuid();\nconsole.log('hello', n);"),
    ("bash", "echo hello $(id -u)"),
])
async def test_node_and_bash_images_serve_their_languages_in_pods(emulator, kubeconfig, pods, lang, code):
    async with executor_for(kubeconfig, {lang: 1}, **IMAGES) as ex:
        assert await ex.wait_warm(120)
        (container,) = running_containers(pods).values()
        suffix = {"js": "javascript", "ts": "typescript", "bash": "bash"}[lang]
        assert container["ImageName"] == containers.sidecar_image(suffix)
        async with ex.sandbox(lang, wait=60) as sb:
            r = await sb.run(code, timeout=30, request_id=f"hello-{lang}")
        assert r.failure is None and r.exit_code == 0, r.stderr
        assert r.stdout.split() == ["hello", "65532"]
