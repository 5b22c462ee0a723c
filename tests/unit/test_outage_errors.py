"""Foreign errors that mean "a dependency is down" become our 503 with retry-after, by type, on both
surfaces; anything else stays a 500. Dispatch after commit survives a broker outage."""

from __future__ import annotations

import httpx
import kombu.exceptions
import psycopg
import pytest
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI

from tierbatch.api.errors import install_error_handlers, outage_of
from tierbatch.base.errors import ServiceUnavailable
from tierbatch.base.messaging import dispatch_after_commit


def wrapped(error: type[sqlalchemy.exc.DBAPIError], invalidated: bool = False) -> sqlalchemy.exc.DBAPIError:
    return error("SELECT 1", {}, psycopg.OperationalError("server closed the connection"),
                 connection_invalidated=invalidated)


@pytest.mark.parametrize(("exc", "dependency"), [
    (wrapped(sqlalchemy.exc.OperationalError), "database"),
    (wrapped(sqlalchemy.exc.InterfaceError, invalidated=True), "database"),
    (sqlalchemy.exc.TimeoutError("QueuePool limit reached"), "database"),
    (psycopg.OperationalError("connection refused"), "database"),
    (redis.exceptions.ConnectionError("Error 111"), "broker"),
    (redis.exceptions.TimeoutError("timed out"), "broker"),
    (kombu.exceptions.OperationalError("Error 111 connecting"), "broker"),
    (ServiceUnavailable("database"), "database"),
])
def test_outages_are_mapped_by_type(exc: BaseException, dependency: str) -> None:
    found = outage_of(exc)
    assert found is not None and found.dependency == dependency


@pytest.mark.parametrize("exc", [
    wrapped(sqlalchemy.exc.IntegrityError), wrapped(sqlalchemy.exc.InterfaceError), ValueError("connection refused"),
    RuntimeError("OperationalError"), redis.exceptions.ResponseError("WRONGTYPE"),
])
def test_other_errors_are_not_outages_whatever_their_message(exc: BaseException) -> None:
    assert outage_of(exc) is None


def app_raising(exc: BaseException) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/tasks")
    def tasks() -> None:
        raise exc

    @app.post("/v1/chat/completions")
    async def chat() -> None:
        raise exc

    return app


@pytest.mark.anyio
async def test_both_surfaces_answer_503_with_retry_after_in_their_shape() -> None:
    app = app_raising(wrapped(sqlalchemy.exc.OperationalError))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        tenant = await client.post("/v1/tasks")
        openai = await client.post("/v1/chat/completions")
    for response in (tenant, openai):
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
    assert tenant.json()["error"]["type"] == "service_unavailable"
    assert set(tenant.json()["error"]) == {"type", "message", "param"}
    assert openai.json()["error"]["type"] == "server_error"
    assert openai.json()["error"]["code"] == "service_unavailable"
    assert "database" in openai.json()["error"]["message"]


@pytest.mark.anyio
async def test_a_database_error_that_is_no_outage_stays_a_500() -> None:
    app = app_raising(wrapped(sqlalchemy.exc.IntegrityError))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/tasks")
    assert response.status_code == 500
    assert "retry-after" not in response.headers
    # the server drops the connection after an unexpected error: the client is told not to reuse it
    assert response.headers["connection"] == "close"


def test_dispatch_after_commit_leaves_a_lost_broker_to_the_reconciler() -> None:
    sent: list[str] = []
    with dispatch_after_commit("tasks"):
        sent.append("first")
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379")
    assert sent == ["first"]
    with pytest.raises(ValueError), dispatch_after_commit("tasks"):
        raise ValueError("a bug is not an outage")
