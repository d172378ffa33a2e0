"""KubeCodeRun's MinIO variables (plus the ``AWS_*`` aliases and ours, ``KCR_``), read only when
``KCR_FILE_STORE=s3``. Kept apart from :mod:`kcr_trio.backends.s3_client` (which re-exports it) so
that module holds the S3 wire and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["S3Settings"]


class S3Settings(BaseSettings):
    """KubeCodeRun's MinIO variables; read only when ``KCR_FILE_STORE=s3``."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore", populate_by_name=True
    )

    minio_endpoint: str = "localhost:9000"  # host[:port], no scheme
    minio_access_key: str | None = Field(None, validation_alias=AliasChoices("minio_access_key", "aws_access_key_id"))
    minio_secret_key: str | None = Field(
        None, validation_alias=AliasChoices("minio_secret_key", "aws_secret_access_key")
    )
    minio_secure: bool = False
    minio_bucket: str = "kubecoderun-files"
    minio_region: str = "us-east-1"
    minio_use_iam: bool = False
    aws_web_identity_token_file: str | None = None
    aws_role_arn: str | None = None
    minio_ca_certs: str | None = None
    # Ours.
    kcr_minio_create_bucket: bool = True  # create the bucket when missing (KubeCodeRun does)
    kcr_s3_max_connections: int = Field(20, ge=1)
    kcr_s3_connect_timeout: float = Field(5.0, gt=0)  # includes waiting for a pooled connection
    kcr_s3_read_timeout: float = Field(30.0, gt=0)  # longest silence on an open connection
    kcr_spool_dir: Path | None = None  # default: <KCR_DATA_DIR>/spool

    @field_validator("minio_endpoint", mode="before")
    @classmethod
    def _strip_scheme(cls, v: Any) -> Any:
        if isinstance(v, str):
            for scheme in ("http://", "https://"):
                if v.startswith(scheme):
                    v = v[len(scheme) :]
            return v.rstrip("/")
        return v

    @field_validator(
        "minio_access_key", "minio_secret_key", "aws_web_identity_token_file", "aws_role_arn", "minio_ca_certs",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v
