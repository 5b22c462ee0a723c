"""Process settings from the environment; the TOML file is read by tierbatch.base.config."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tierbatch.base.errors import ConfigError
from tierbatch.base.secretbox import SecretBox

DEFAULT_DATABASE_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MIN_ADMIN_TOKEN_CHARS = 32
BATCH_FILE_MAX_BYTES = 200_000_000  # OpenAI's Batch API input limits
BATCH_FILE_MAX_LINES = 50_000


class Settings(BaseSettings):
    # hide_input_in_errors: an error never repeats a secret (admin token, a URL with its password)
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    database_url: str = Field(default=DEFAULT_DATABASE_URL, validation_alias="DATABASE_URL")
    redis_url: str = Field(default=DEFAULT_REDIS_URL, validation_alias="REDIS_URL")
    config_path: Path | None = Field(default=None, validation_alias="TIERBATCH_CONFIG")
    # empty: the admin routes are off (every admin request is a 401); else at least 32 characters
    admin_token: str = Field(default="", validation_alias="TIERBATCH_ADMIN_TOKEN")
    # lets several deployments (or test runs) share one Redis without reading each other's messages
    redis_key_prefix: str = Field(default="", validation_alias="TIERBATCH_REDIS_PREFIX")
    # encrypts webhook signing secrets at rest (tierbatch/base/secretbox.py); empty: no webhook can be signed
    secret_key: str = Field(default="", validation_alias="TIERBATCH_SECRET_KEY", repr=False)
    # Batch API input files: OpenAI's limits by default; lower ones for small deployments and tests
    batch_file_max_bytes: int = Field(default=BATCH_FILE_MAX_BYTES, gt=0, le=BATCH_FILE_MAX_BYTES,
                                      validation_alias="TIERBATCH_BATCH_FILE_MAX_BYTES")
    batch_file_max_lines: int = Field(default=BATCH_FILE_MAX_LINES, gt=0, le=BATCH_FILE_MAX_LINES,
                                      validation_alias="TIERBATCH_BATCH_FILE_MAX_LINES")

    @field_validator("batch_file_max_bytes", "batch_file_max_lines", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object, info: ValidationInfo) -> object:
        if value == "":
            return BATCH_FILE_MAX_BYTES if info.field_name == "batch_file_max_bytes" else BATCH_FILE_MAX_LINES
        return value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: str) -> str:
        """A malformed key stops the process at start, not at the first webhook."""
        try:
            SecretBox.parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    def secret_box(self) -> SecretBox | None:
        return SecretBox.parse(self.secret_key)

    @field_validator("admin_token")
    @classmethod
    def _admin_token_long_enough(cls, value: str) -> str:
        if value and len(value) < MIN_ADMIN_TOKEN_CHARS:
            # the value itself is never repeated: it would end up in logs
            raise ValueError(f"TIERBATCH_ADMIN_TOKEN is {len(value)} characters long; it must be at least "
                             f"{MIN_ADMIN_TOKEN_CHARS} (generate one: python -c 'import secrets; "
                             f"print(secrets.token_urlsafe(32))'), or empty to turn the admin routes off")
        return value

    @property
    def psycopg_dsn(self) -> str:
        """The database URL without SQLAlchemy's driver suffix, for plain psycopg."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
