"""Request bodies as LibreChat sends them, validated with pydantic.

Unknown fields are ignored (LibreChat spreads its auth values and more into the body). File refs
accept ``storage_session_id`` as an alias of ``session_id`` (agents ≥ 3.1.80) and ignore
``resource_id``, ``kind`` and ``version``.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError


class FileRefBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    session_id: str = Field(validation_alias=AliasChoices("session_id", "storage_session_id"))
    name: str


class ExecBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str
    lang: str
    args: Any = None  # checked by api.exec_fields (400, not 422, like the official server)
    timeout: Any = None  # milliseconds
    runtime_session_hint: Any = None  # validated only in the stateful profile (api.profiles)
    user_id: str | None = None
    entity_id: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    session_id: str | None = None
    files: list[FileRefBody] = Field(default_factory=list)


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """KubeCodeRun's 422 ``details``: ``{"field": "body -> files -> 0 -> session_id", ...}``."""
    details = []
    for err in exc.errors(include_url=False):
        loc = ["body", *(str(part) for part in err.get("loc", ()))]
        details.append({"field": " -> ".join(loc), "message": err.get("msg", ""), "code": err.get("type", "")})
    return details
