"""Shared fixtures. Unit tests need none of the services; integration tests get real ones."""

from __future__ import annotations

import os

import pytest

from tierbatch.base.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL


def _test_redis_url() -> str:
    """The server of REDIS_URL, but database 15: tests flush it, so it is theirs alone."""
    from redis.connection import parse_url

    explicit = os.environ.get("TEST_REDIS_URL")
    if explicit:
        return explicit
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    parse_url(url)  # fail early on a malformed URL
    base = url.split("?", 1)[0]
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/15"


TEST_REDIS_URL = _test_redis_url()


@pytest.fixture(scope="session")
def base_database_url() -> str:
    return os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
