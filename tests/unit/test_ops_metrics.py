"""Metrics from finished request scopes, and pool gauges from executor status snapshots."""

from __future__ import annotations

from typing import Any

import trio

from kcr_trio.api.metrics import Metrics
from kcr_trio.api.scope import RequestScope
from tests.support.ops import scrape, total


def finished(**fields: Any) -> RequestScope:
    rs = RequestScope(nursery=None, request_id="r")  # type: ignore[arg-type]
    rs.finished = 0.01
    for key, value in fields.items():
        setattr(rs, key, value)
    return rs


def test_hangup_signature_counts_only_closes_near_five_seconds() -> None:
    m = Metrics()
    for after in (4.2, 4.95, 5.0, 5.08, 5.3):
        m.on_finish(finished(route="/exec", status=200, outcome="client_gone", client_gone_after=after,
                             gone_in_phase="execute"), {"method": "POST"})
    s = scrape(m.render(None).decode())
    assert total(s, "kcr_client_hangup_signature_total") == 3
    assert total(s, "kcr_client_disconnects_total", route="/exec") == 5
    assert total(s, "kcr_exec_killed_on_cancel_total") == 5
    # The 4.9 and 5.1 s bucket edges isolate the signature in the histogram too.
    assert total(s, "kcr_client_disconnect_after_seconds_bucket", le="5.1") - total(
        s, "kcr_client_disconnect_after_seconds_bucket", le="4.9") == 3


def test_killed_on_cancel_only_in_the_execute_phase() -> None:
    m = Metrics()
    for phase in ("store", "acquire", "upload", "execute", "collect", None):
        m.on_finish(finished(route="/exec", outcome="client_gone", client_gone_after=1.0, gone_in_phase=phase,
                             phases={"store": 1.0}), {"method": "POST"})
    s = scrape(m.render(None).decode())
    assert total(s, "kcr_exec_killed_on_cancel_total") == 1
    assert total(s, "kcr_exec_phase_duration_seconds_count") == 0  # abandoned runs do not blur phases


def test_unmatched_routes_share_one_label_and_statuses_are_strings() -> None:
    m = Metrics()
    for path_status in (404, 404, 401):
        m.on_finish(finished(route=None, status=path_status, outcome="ok"), {"method": "GET"})
    m.on_finish(finished(route="/exec", status=None, outcome="client_gone"), {"method": "POST"})
    s = scrape(m.render(None).decode())
    assert total(s, "kcr_http_requests_total", route="unmatched", status="404") == 2
    assert total(s, "kcr_http_requests_total", route="/exec", status="none") == 1


def test_pool_gauges_from_any_executor_status() -> None:
    m = Metrics()
    kubernetes_like = {
        "ready": True, "warm": False, "executor": "kubernetes", "watch_error": None,
        "pools": {"py": {"target": 3, "ready": 2, "starting": 1, "in_use": 4, "waiting": 0, "warmed": True,
                         "last_error": "x"},
                  "js": {"target": 1, "ready": 1, "starting": 0, "in_use": 0, "waiting": 2, "warmed": True}},
    }
    s = scrape(m.render(kubernetes_like).decode())
    assert total(s, "kcr_executor_ready") == 1 and total(s, "kcr_executor_warm") == 0
    assert total(s, "kcr_pool_in_use", language="py") == 4 and total(s, "kcr_pool_waiting", language="js") == 2
    assert total(s, "kcr_pool_target") == 4
    assert not any(name.startswith("kcr_pool_last_error") for name, _ in s)
    local_like = {"ready": True, "pools": {"py": {"warm": 2, "target": 2}}, "in_use": 1, "capacity": 4}
    s = scrape(m.render(local_like).decode())
    assert total(s, "kcr_pool_warm", language="py") == 2 and total(s, "kcr_executor_capacity") == 4
    # Between scrapes nothing is kept: a scrape without status has only the "up" gauge at 0.
    s = scrape(m.render(None).decode())
    assert total(s, "kcr_executor_status_up") == 0 and total(s, "kcr_executor_capacity") == 0


def test_registries_are_per_server() -> None:
    a, b = Metrics(), Metrics()
    a.on_finish(finished(route="/health", status=200, outcome="ok"), {"method": "GET"})
    assert total(scrape(b.render(None).decode()), "kcr_http_requests_total") == 0
    trio.run(trio.lowlevel.checkpoint)  # the module needs no running loop
