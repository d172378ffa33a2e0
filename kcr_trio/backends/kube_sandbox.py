"""The sandbox the core gets from the Kubernetes executor: one pod, one run.

It wraps the protocol client (our sidecar's, or KubeCodeRun's runner's with its quirks handled in
:mod:`.kube_runner`) and turns "the pod died" into a readable result. **Pod failures** (OOMKilled,
evicted, killed, image pull errors) are read from the pod status: a run on a pod that dies returns
a ``RunResult`` whose ``failure`` and ``stderr`` say why, and a broken upload or listing raises
``errors.Unavailable`` with that reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager

import httpx
import trio

from kcr_trio.core.errors import Unavailable
from kcr_trio.core.interfaces import Sandbox
from kcr_trio.core.model import GeneratedFile, RunResult

from .kube_settings import KubernetesSettings
from .kube_watch import TrackedPod

__all__ = ["PodSandbox", "SandboxFactory", "pod_base_url", "protocol_sandbox_factory"]

SandboxFactory = Callable[[httpx.AsyncClient, str], Sandbox]
SIGNAL_DEATH_GRACE = 1.0  # how long a runner's "-1, no stderr" waits for the pod to report an OOM kill


def _sidecar_sandbox(client: httpx.AsyncClient, base_url: str) -> Sandbox:
    from .sidecar_client import SidecarSandbox

    return SidecarSandbox(base_url, client=client)


def protocol_sandbox_factory(k: KubernetesSettings) -> SandboxFactory:
    """Our sidecar, or KubeCodeRun's runner with its quirks handled (:mod:`.kube_runner`)."""
    if k.kcr_pod_protocol != "kcr-runner":
        return _sidecar_sandbox
    from .kube_runner import RunnerSandbox

    cap = k.kcr_runner_max_execution_time
    return lambda client, base_url: RunnerSandbox(base_url, client=client, runner_cap=cap)


def pod_base_url(pod: TrackedPod, port: int) -> str:
    ip = pod.view.ip if pod.view else None
    if not ip:
        raise Unavailable("Execution pod has no IP address")
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


class PodSandbox:
    """A sidecar sandbox on one pod, which turns "the pod died" into a readable result."""

    def __init__(self, pod: TrackedPod, inner: Sandbox, *, runner: bool, memory_limit: str) -> None:
        self.pod = pod
        self._inner = inner
        self._runner = runner  # KubeCodeRun's runner protocol (reports signal deaths as -1)
        self._memory_limit = memory_limit

    @property
    def pod_name(self) -> str:
        return self.pod.name

    def sidecar_endpoint(self) -> tuple[str, httpx.AsyncClient] | None:
        """``SidecarEndpoint``: the pod's sidecar, if the inner sandbox talks to one."""
        from .sidecar_client import SidecarEndpoint

        return self._inner.sidecar_endpoint() if isinstance(self._inner, SidecarEndpoint) else None

    async def put_file(self, name: str, chunks: AsyncIterable[bytes]) -> None:
        try:
            await self._inner.put_file(name, chunks)
        except Unavailable as exc:
            raise Unavailable(await self.pod.failure_reason(exc)) from exc

    async def run(self, code: str, *, timeout: float, request_id: str, args: Sequence[str] = ()) -> RunResult:
        result: RunResult | None = None
        error: Unavailable | None = None
        async with trio.open_nursery() as nursery:

            async def on_pod_death() -> None:
                await self.pod.wait_for(lambda p: p.failure is not None)
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_pod_death)
            try:
                result = await self._inner.run(code, timeout=timeout, request_id=request_id, args=args)
            except Unavailable as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if result is not None and result.failure is None:
            if self._runner and result.exit_code == -1 and not result.timed_out:
                return await self._signal_death(result)
            return result
        # The pod died, or the sidecar could not be reached: say why, from the pod's status.
        cause: BaseException | str | None = error or (result.failure if result else None)
        reason = await self.pod.failure_reason(cause)
        return RunResult(exit_code=self.pod.exit_code, stdout="", stderr=reason, failure=reason)

    async def _signal_death(self, result: RunResult) -> RunResult:
        """KubeCodeRun's runner answers -1 with empty stderr when the program died of a signal. If
        the whole container went (an OOM kill of the pod), its status says why; otherwise say
        what we know."""
        with trio.move_on_after(SIGNAL_DEATH_GRACE):
            await self.pod.wait_for(lambda p: p.failure is not None)
        if self.pod.failure:
            return RunResult(exit_code=self.pod.exit_code, stdout=result.stdout, stderr=self.pod.failure,
                             failure=self.pod.failure, duration_ms=result.duration_ms)
        from .kube_runner import append_line

        result.stderr = append_line(result.stderr, (
            "The program was killed by a signal. The execution image (KubeCodeRun's runner) does not "
            f"report which signal; running out of memory (limit {self._memory_limit}) is the usual cause."))
        return result

    async def generated_files(self) -> list[GeneratedFile]:
        try:
            return await self._inner.generated_files()
        except Unavailable as exc:
            raise Unavailable(await self.pod.failure_reason(exc)) from exc

    def open_file(self, name: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._inner.open_file(name)
