"""Execution profiles (contract §3.1): ``X-CodeAPI-Expected-Profile`` fails closed.

LibreChat sends the profile an agent expects: ``default`` (stateless sandboxes) or ``stateful``
(a durable ``/mnt/data`` per runtime session, ``core.runtime``). A deployment serves the profiles
in ``KCR_EXECUTION_PROFILES``; the first one is what a request without the header gets (older
clients send none). Before anything is queued:

* a value that is neither ``default`` nor ``stateful`` → 400 ``invalid_execution_profile``;
* a profile this deployment does not serve → 409 ``execution_profile_mismatch`` in the official
  shape, which the 3.9.x client shows the model as a permanent capability mismatch ("do not
  retry"). Nothing ever falls back silently: a stateful agent never gets stateless runs while its
  prompt says files persist.

Every response carries ``X-CodeAPI-Execution-Profile: <profile served>`` (informational).
"""

from __future__ import annotations

from typing import Any

from quart import Response, g, request

from kcr_trio.config import Settings
from kcr_trio.core.runtime import runtime_session_id, validate_hint

from .errors import CodedError
from .principal import current_principal_id

EXPECTED_HEADER = "X-CodeAPI-Expected-Profile"
ACTUAL_HEADER = "X-CodeAPI-Execution-Profile"
KNOWN = ("default", "stateful")


class ProfileConfigError(ValueError):
    """``KCR_EXECUTION_PROFILES`` names no profile or an unknown one (start-up refuses)."""


def served_profiles(settings: Settings) -> tuple[str, ...]:
    names = [p.strip().lower() for p in settings.kcr_execution_profiles.split(",") if p.strip()]
    bad = [p for p in names if p not in KNOWN]
    if bad or not names:
        raise ProfileConfigError("KCR_EXECUTION_PROFILES must list default and/or stateful, "
                         f"got {settings.kcr_execution_profiles!r}")
    return tuple(dict.fromkeys(names))


def resolve(expected: str | None, served: tuple[str, ...]) -> str:
    """The profile to serve for a request whose header says ``expected``."""
    if expected is None or not expected.strip():
        return served[0]
    value = expected.strip().lower()
    if value not in KNOWN:
        raise CodedError("invalid_execution_profile",
                         f"Unknown execution profile {expected.strip()[:32]!r}; expected default or stateful",
                         status=400, expected_profile=expected.strip()[:32])
    if value not in served:
        raise CodedError("execution_profile_mismatch",
                         f"Expected the {value} execution profile, but reached {served[0]}",
                         status=409, expected_profile=value, actual_profile=served[0])
    return value


def install(app: Any, settings: Settings) -> None:
    """Register the profile check (after authentication) and the response header."""
    served = served_profiles(settings)

    @app.before_request  # type: ignore[untyped-decorator]
    async def _check_profile() -> None:
        g.execution_profile = served[0]
        if request.method == "POST" and (request.path == "/exec" or request.path.startswith("/exec/")):
            g.execution_profile = resolve(request.headers.get(EXPECTED_HEADER), served)

    @app.after_request  # type: ignore[untyped-decorator]
    async def _profile_header(response: Response) -> Response:
        response.headers[ACTUAL_HEADER] = g.get("execution_profile", served[0])
        return response


def runtime_session_for(hint: Any) -> str | None:
    """The stateful request's runtime session id (``core.runtime``), or ``None`` for ``default``.

    In the default profile a string hint is ignored without being validated (the official
    stateless mode). In the stateful profile it is required and validated: a stateful call without one
    would be a silent one-shot, the very drift the profile header exists to stop.
    """
    return runtime_session(hint, g.get("execution_profile"), current_principal_id())


def runtime_session(hint: Any, profile: str | None, principal_id: str | None) -> str | None:
    """:func:`runtime_session_for` for an explicit profile and principal (``api.exec_fast``)."""
    if hint is not None and not isinstance(hint, str):
        validate_hint(hint)  # a non-string is refused in any profile (the schema says string)
    if profile != "stateful":
        return None
    if hint is None or hint == "":
        raise CodedError("runtime_session_hint_required",
                         "The stateful execution profile needs a runtime_session_hint", status=400)
    return runtime_session_id(principal_id or "anonymous", validate_hint(hint))
