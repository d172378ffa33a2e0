"""Settings, read from the environment (and an optional ``.env``).

Names are KubeCodeRun's wherever the two overlap (``API_PORT``, ``API_KEY``, ``MAX_EXECUTION_TIME``,
``MAX_FILE_SIZE_MB`` …), so one ConfigMap/Secret can serve both servers in an A/B deployment. Our own
settings carry a ``KCR_`` prefix. Backend-specific settings (Redis, MinIO/S3, Kubernetes) live in their
backend modules as their own small settings classes, read only when that backend is selected.

With nothing set, ``kcr-trio serve`` runs the embedded defaults: in-memory sessions, files under
``KCR_DATA_DIR``, and a local pool of sidecar processes.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "kcr-trio"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore"
    )

    # --- server -------------------------------------------------------------------------------
    api_host: str = "0.0.0.0"
    api_port: int = Field(8000, ge=0, le=65535)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    enable_docs: bool = True
    kcr_cors_origins: str = ""  # CORS on /download for these origins ("*" = any); empty = off
    kcr_data_dir: Path = Field(default_factory=_default_data_dir)

    # --- authentication -----------------------------------------------------------------------
    # When neither API_KEY nor API_KEYS is set, a random key is generated at start-up and written to
    # ``<KCR_DATA_DIR>/api-key`` (mode 0600): the server never runs open by accident.
    api_key: str | None = None
    api_keys: str = ""  # comma-separated
    auth_trusted_networks: str = ""  # comma-separated CIDRs that skip auth (socket peer address)
    # LibreChat's short-lived JWTs (api/jwt_auth.py). "auto": "both" when a JWT key is configured,
    # else "api-key". "librechat-jwt" refuses API keys. Names follow LibreChat's CODEAPI_AUTH_PROVIDER.
    kcr_auth_provider: Literal["auto", "api-key", "librechat-jwt", "both"] = "auto"
    kcr_jwt_public_key_file: Path | None = None  # PEM (Ed25519 or RSA public key)
    kcr_jwt_jwks_file: Path | None = None  # {"keys": [...]}, chosen by the token's "kid"
    kcr_jwt_audience: str = "codeapi"
    kcr_jwt_issuer: str = "librechat"
    kcr_jwt_algorithms: str = "EdDSA,RS256"
    kcr_jwt_max_lifetime: int = Field(300, ge=1, le=86400)  # exp - iat, seconds
    kcr_jwt_leeway: float = Field(5.0, ge=0.0, le=60.0)  # clock skew allowed on exp/iat/nbf

    # --- execution profiles (api/profiles.py, core/runtime.py) --------------------------------
    # "default" (stateless), "stateful" (durable /mnt/data per runtime session), or both; the first
    # is what requests without X-CodeAPI-Expected-Profile get.
    kcr_execution_profiles: str = "default"
    kcr_runtime_session_ttl_hours: float = Field(24.0, gt=0.0, le=8760.0)  # after the last call
    kcr_runtime_session_max_mb: int = Field(100, ge=1, le=100_000)  # workspace bytes
    kcr_runtime_session_max_files: int = Field(200, ge=1, le=100_000)
    kcr_runtime_session_lock_wait: float = Field(60.0, ge=0.0)  # wait for a concurrent call, then 409

    # --- limits (KubeCodeRun names and ranges) ------------------------------------------------
    max_execution_time: int = Field(30, ge=1, le=600)
    max_file_size_mb: int = Field(10, ge=1, le=500)
    max_files_per_session: int = Field(50, ge=1, le=500)
    max_output_files: int = Field(10, ge=1, le=100)
    kcr_max_file_refs: int = Field(100, ge=1, le=10_000)  # file refs per /exec request (413)
    max_memory_mb: int = Field(512, ge=16)
    max_pids: int = Field(64, ge=4)
    max_open_files: int = Field(256, ge=16)
    max_concurrent_executions: int = Field(
        default_factory=lambda: max(2, 2 * (os.cpu_count() or 1)), ge=1
    )
    kcr_max_output_chars: int = Field(65536, ge=1024)  # per stream, after the run
    kcr_max_json_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    kcr_max_code_bytes: int = Field(1024 * 1024, ge=16)
    kcr_body_timeout: float = Field(60.0, gt=0.0)  # a request body must arrive within this (408)
    # What a request may hold before its key is checked (body-key auth; api/anonymous.py).
    kcr_unauth_body_bytes: int = Field(256 * 1024, ge=1024)
    kcr_unauth_body_budget_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    session_ttl_hours: int = Field(0, ge=0, le=8760)  # 0 = sessions never expire (KubeCodeRun main)
    session_cleanup_interval_minutes: int = Field(10, ge=1)
    # Objects without metadata (backends/orphan_sweeper.py): how often, and how old they must be.
    kcr_orphan_sweep: bool = True
    kcr_orphan_sweep_interval: float = Field(600.0, gt=0.0)
    kcr_orphan_min_age: float = Field(3600.0, ge=1.0)

    # --- operations (metrics, rate limits, timeouts of the non-/exec routes) -------------------
    kcr_metrics: bool = True  # Prometheus /metrics (and the per-request counters behind it)
    kcr_metrics_port: int | None = Field(None, ge=0, le=65535)  # serve /metrics only there
    kcr_metrics_auth: bool = True  # /metrics needs an API key, like any other route
    kcr_request_timeout: float = Field(30.0, gt=0.0)  # deadline of the non-/exec handlers (504)
    kcr_ready_timeout: float = Field(3.0, gt=0.0)  # per dependency check of /ready
    rate_limit_enabled: bool = True  # KubeCodeRun's switch; the limits below decide what applies
    kcr_rate_limit_per_minute: int = Field(0, ge=0)  # requests per API key; 0 = unlimited
    kcr_rate_limit_per_hour: int = Field(0, ge=0)
    kcr_auth_failures_per_minute: int = Field(60, ge=0)  # per client IP, then 429; 0 = off

    # --- hang-up immunity (keepalive.md) -------------------------------------------------------
    kcr_heartbeat: bool = True
    kcr_heartbeat_grace: float = Field(1.0, ge=0.0)  # seconds of silence before committing a 200
    kcr_heartbeat_interval: float = Field(2.0, gt=0.0, le=4.0)  # one space at least this often
    kcr_connection_close: bool = True  # on /files, /download, /upload, freshness responses
    # ... to LibreChat / axios requests only, or to every client (api/connection_policy.py).
    kcr_connection_close_clients: Literal["librechat", "all"] = "librechat"
    kcr_keep_alive_timeout: float = Field(75.0, gt=5.0)
    # A partial request head buffered this long gets a 408 and a close (None: the keep-alive timeout).
    kcr_head_timeout: float | None = Field(None, gt=0.0)
    kcr_graceful_timeout: float | None = None  # default: MAX_EXECUTION_TIME + 10 s

    # --- execution ----------------------------------------------------------------------------
    kcr_session_store: Literal["memory", "redis"] = "memory"
    kcr_file_store: Literal["local", "s3"] = "local"
    kcr_executor: Literal["local", "kubernetes"] = "local"
    # How long /exec waits for a free sandbox before answering 503 + Retry-After.
    # It defaults below KCR_COMMIT_HOLD_MAX so that "busy" is still a real 503 (nothing committed).
    kcr_acquire_timeout: float = Field(3.0, ge=0.0)
    # While a sandbox is being acquired, /exec holds its heartbeat commit up to this long (from the
    # request start), so a busy answer can still be a 503. Must stay below the 5 s client timer.
    kcr_commit_hold_max: float = Field(4.0, ge=0.0, le=4.5)
    kcr_busy_retry_after: float = Field(2.0, ge=1.0)
    # Time allowed, on top of MAX_EXECUTION_TIME, for store, upload and collection phases.
    kcr_exec_overhead: float = Field(30.0, ge=1.0)
    # Wall-clock seconds the compile steps of one run may take (go java c cpp rs f90 d), separate
    # from the program's timeout, which starts once they are done (local executor; pods keep
    # KubeCodeRun's shared timeout). A run over it answers "Compilation timed out after N seconds".
    kcr_compile_timeout: float = Field(60.0, gt=0.0)
    # Programmatic tool calling (api/ptc_http.py): keep runs suspended in their sandbox between
    # round trips (false: replay every round, as the official server does); the URL other replicas
    # use to forward continuations here (default: the bound address); bash batching window.
    kcr_ptc_live: bool = True
    kcr_ptc_advertise_url: str | None = None
    kcr_ptc_bash_settle: float = Field(0.05, ge=0.0, le=2.0)
    # A suspended run holds a sandbox slot: at most this many at once (default: half the executor's
    # capacity), each at most this long; beyond either, the execution continues by replay.
    kcr_ptc_max_suspended: int | None = Field(None, ge=0)
    kcr_ptc_suspend_max: float = Field(120.0, gt=0.0, le=600.0)
    # Warm sandboxes per language (KubeCodeRun's POD_POOL_<LANG>); shared by local and Kubernetes.
    pod_pool_py: int = Field(2, ge=0)
    pod_pool_js: int = Field(1, ge=0)
    pod_pool_bash: int = Field(1, ge=0)
    pod_pool_ts: int = Field(0, ge=0)
    pod_pool_go: int = Field(0, ge=0)
    pod_pool_java: int = Field(0, ge=0)
    pod_pool_c: int = Field(0, ge=0)
    pod_pool_cpp: int = Field(0, ge=0)
    pod_pool_php: int = Field(0, ge=0)
    pod_pool_rs: int = Field(0, ge=0)
    pod_pool_r: int = Field(0, ge=0)
    pod_pool_f90: int = Field(0, ge=0)
    pod_pool_d: int = Field(0, ge=0)
    # Sidecar behaviour, passed to local sidecars (pods get the same as env).
    kcr_sidecar_prewarm: bool = True
    kcr_python_preimports: str = ""  # comma-separated modules imported by pre-warmed Python
    # Local sandboxing (bubblewrap). "auto": use it when it works, else refuse to start unless
    # KCR_UNSANDBOXED_TRUSTED is set.
    kcr_sandbox: Literal["auto", "bwrap", "none"] = "auto"
    kcr_sandbox_allow_network: bool = False
    kcr_unsandboxed_trusted: bool = False

    @field_validator("api_key")
    @classmethod
    def _blank_key_is_none(cls, v: str | None) -> str | None:
        return v.strip() or None if v else None

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """Every accepted key, in configuration order (``API_KEY`` first)."""
        keys = [self.api_key] if self.api_key else []
        keys += [k.strip() for k in self.api_keys.split(",") if k.strip()]
        return tuple(dict.fromkeys(keys))

    @property
    def auth_provider(self) -> str:
        """The effective auth mode: ``api-key``, ``librechat-jwt`` or ``both``."""
        if self.kcr_auth_provider != "auto":
            return self.kcr_auth_provider
        jwt_key = self.kcr_jwt_public_key_file is not None or self.kcr_jwt_jwks_file is not None
        return "both" if jwt_key else "api-key"

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_size_mb * 1024 * 1024

    @property
    def graceful_timeout(self) -> float:
        if self.kcr_graceful_timeout is not None:
            return self.kcr_graceful_timeout
        return self.max_execution_time + 10.0

    def pool_size(self, language: str) -> int:
        return int(getattr(self, f"pod_pool_{language}", 0))
