"""Process settings from the environment (DESIGN §7); the TOML file is read by core.config."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    database_url: str = Field(default=DEFAULT_DATABASE_URL, validation_alias="DATABASE_URL")
    redis_url: str = Field(default=DEFAULT_REDIS_URL, validation_alias="REDIS_URL")
    config_path: Path | None = Field(default=None, validation_alias="TIERBATCH_CONFIG")
    admin_token: str = Field(default="", validation_alias="TIERBATCH_ADMIN_TOKEN")
    # lets several deployments (or test runs) share one Redis without reading each other's messages
    redis_key_prefix: str = Field(default="", validation_alias="TIERBATCH_REDIS_PREFIX")

    @property
    def psycopg_dsn(self) -> str:
        """The database URL without SQLAlchemy's driver suffix, for plain psycopg."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
