"""Run Alembic programmatically (the `tierbatch migrate` command and tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str, secret_key: str | None = None) -> Config:
    """`secret_key` (TIERBATCH_SECRET_KEY's format) lets a migration encrypt stored secrets; None: the
    environment's, through Settings."""
    config = Config()
    if secret_key is not None:
        config.attributes["secret_key"] = secret_key
    config.set_main_option("script_location", str(Path(__file__).parent))
    # '%' must be escaped for configparser interpolation
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_to_head(database_url: str, secret_key: str | None = None) -> None:
    command.upgrade(alembic_config(database_url, secret_key), "head")
