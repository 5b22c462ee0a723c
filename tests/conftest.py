"""Shared fixtures. Unit tests need none of the services; integration tests get real ones."""

from __future__ import annotations

import os

import pytest

from core.settings import DEFAULT_DATABASE_URL

# Tests use a Redis database of their own, flushed per test.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def base_database_url() -> str:
    return os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
