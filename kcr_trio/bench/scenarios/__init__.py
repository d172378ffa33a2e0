"""The benchmark scenarios, by name. Each module defines one class with ``steps`` and ``run``."""

from __future__ import annotations

from kcr_trio.bench.model import Scenario


def registry() -> dict[str, Scenario]:
    from kcr_trio.bench.scenarios.concurrency import Concurrency
    from kcr_trio.bench.scenarios.conformance import ConformanceScenario
    from kcr_trio.bench.scenarios.disconnect_storm import DisconnectStorm
    from kcr_trio.bench.scenarios.exec_latency import ExecLatency
    from kcr_trio.bench.scenarios.files_rps import FilesRps
    from kcr_trio.bench.scenarios.http_cost import HttpCost
    from kcr_trio.bench.scenarios.keepalive import KeepAlive
    from kcr_trio.bench.scenarios.ptc import Ptc
    from kcr_trio.bench.scenarios.slow_clients import SlowClients
    from kcr_trio.bench.scenarios.upload_exec import UploadExec

    scenarios: list[Scenario] = [
        ExecLatency(), Concurrency(), UploadExec(), KeepAlive(), DisconnectStorm(), SlowClients(), FilesRps(),
        ConformanceScenario(), Ptc(), HttpCost(),
    ]
    return {s.name: s for s in scenarios}
