"""API keys, revocation across API processes, per-tenant rate limits, failed-authentication limits, the admin
token's minimum length: checked as an attacker (or a careless operator) would, against real processes."""

from __future__ import annotations

import os
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.procs import ManagedProcess, free_port, python_module, wait_http_ok, wait_until
from tests.support.stack import ADMIN_TOKEN, Stack, psycopg_dsn, scratch_database, write_app_config
from tierbatch.base.settings import MIN_ADMIN_TOKEN_CHARS

pytestmark = pytest.mark.integration

SECOND_API_FAILED_AUTH_PER_MINUTE = 5
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}


def fresh_address() -> str:
    """A loopback source address of this test's own: failed authentications are counted per address, so a
    test never inherits another one's failures (Linux routes all of 127/8 to lo)."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def client(base_url: str, key: str | bytes | None, address: str | None = None) -> httpx.Client:
    raw = key if isinstance(key, bytes) else (key or "").encode()
    headers = {} if key is None else {b"Authorization": b"Bearer " + raw}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30,
                        transport=httpx.HTTPTransport(local_address=address or fresh_address()))


def sim_chat_calls(stack: Stack) -> int:
    return sum(stack.sim("GET", "/_sim/stats")["chat_calls"].values())


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def new_tenant(stack: Stack, name: str = "keys") -> dict[str, Any]:
    with stack.admin_client() as admin:
        response = admin.post("/v1/admin/tenants", json={"name": name})
        assert response.status_code == 201
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def second_api(stack: Stack) -> Iterator[str]:
    """One more API process on the same database and Redis (as behind a load balancer), with a low limit
    on failed authentications; stopped at the end of the module."""
    config = write_app_config(stack.tmp / "second-api.toml", stack.simulator_port,
                              f"[limits]\nfailed_auth_per_minute = {SECOND_API_FAILED_AUTH_PER_MINUTE}\n"
                              "failed_auth_exempt_networks = []\n")
    port = free_port()
    proc = ManagedProcess(python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port", str(port)),
                          env={**stack.env, "TIERBATCH_CONFIG": str(config)},
                          log_path=stack.tmp / "second-api.log")
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


# --- keys ------------------------------------------------------------------------------------------


def test_a_new_key_works_and_no_listing_shows_a_secret(stack: Stack) -> None:
    tenant = new_tenant(stack)
    with stack.admin_client() as admin:
        created = admin.post(f"/v1/admin/tenants/{tenant['id']}/keys")
        assert created.status_code == 201
        new = created.json()
        assert set(new) >= {"id", "api_key", "created_at"} and new["api_key"] != tenant["api_key"]
        listed = admin.get(f"/v1/admin/tenants/{tenant['id']}/keys")
        assert listed.status_code == 200
    # both keys work, on both surfaces, and reach the same tenant's data
    for key in (tenant["api_key"], new["api_key"]):
        with client(stack.api_url, key) as tenant_client:
            assert tenant_client.get("/v1/tasks").status_code == 200
            assert tenant_client.get("/v1/models").status_code == 200
    body = listed.json()
    assert body["object"] == "list" and len(body["data"]) == 2
    assert {k["id"] for k in body["data"]} == {new["id"], str(query(stack, "SELECT id FROM api_keys WHERE "
                                               "tenant_id = %s AND id <> %s", tenant["id"], new["id"])[0][0])}
    # the secrets (and their digests) appear nowhere in the listing
    stored = [row[0] for row in query(stack, "SELECT key_hash FROM api_keys WHERE tenant_id = %s", tenant["id"])]
    for secret in (tenant["api_key"], new["api_key"], tenant["api_key"][10:], new["api_key"][10:], *stored):
        assert secret not in listed.text
    assert all(k["revoked_at"] is None and len(k["prefix"]) == 10 for k in body["data"])
    # the database holds no key in the clear either
    dump = str(query(stack, "SELECT * FROM api_keys WHERE tenant_id = %s", tenant["id"]))
    assert new["api_key"] not in dump and tenant["api_key"] not in dump


def test_keys_of_an_unknown_tenant_or_key_are_404(stack: Stack) -> None:
    tenant = new_tenant(stack)
    other = new_tenant(stack, "other")
    other_key = query(stack, "SELECT id FROM api_keys WHERE tenant_id = %s", other["id"])[0][0]
    with stack.admin_client() as admin:
        assert admin.post(f"/v1/admin/tenants/{uuid.uuid4()}/keys").status_code == 404
        assert admin.get("/v1/admin/tenants/not-a-uuid/keys").status_code == 404
        assert admin.delete(f"/v1/admin/tenants/{tenant['id']}/keys/not-a-uuid").status_code == 404
        # another tenant's key cannot be revoked through this tenant
        assert admin.delete(f"/v1/admin/tenants/{tenant['id']}/keys/{other_key}").status_code == 404
    with client(stack.api_url, other["api_key"]) as still_valid:
        assert still_valid.get("/v1/tasks").status_code == 200
    # tenant keys are no admin credential
    with client(stack.api_url, tenant["api_key"]) as tenant_client:
        assert tenant_client.get(f"/v1/admin/tenants/{tenant['id']}/keys").status_code == 401


def test_a_revoked_key_is_refused_within_a_second_on_another_api_process(sim_reset: Stack,
                                                                        second_api: str) -> None:
    stack = sim_reset
    tenant = new_tenant(stack)
    with stack.admin_client() as admin:
        new = admin.post(f"/v1/admin/tenants/{tenant['id']}/keys").json()
    address = fresh_address()
    with client(second_api, new["api_key"], address) as other, client(stack.api_url, new["api_key"]) as main:
        # accepted just before on both processes and both surfaces (so both processes remember the key)
        for _ in range(2):
            assert other.get("/v1/tasks").status_code == 200
            assert other.get("/v1/models").status_code == 200
            assert main.get("/v1/models").status_code == 200
        assert other.post("/v1/chat/completions", json=CHAT).status_code == 200

        with stack.admin_client() as admin:
            revoked = admin.delete(f"/v1/admin/tenants/{tenant['id']}/keys/{new['id']}")
        assert revoked.status_code == 200
        revoked_at = time.monotonic()
        assert revoked.json()["id"] == new["id"] and revoked.json()["revoked_at"] is not None
        # each route is asked until it refuses; every request sent a second or more after the revocation must
        # be refused (on a loaded machine the polling itself is slow, so its pace is no measure)
        routes = [(other, "/v1/tasks"), (other, "/v1/models"), (other, "/v1/files"), (other, "/v1/batches"),
                  (main, "/v1/models"), (main, "/v1/tasks")]
        seen: list[tuple[str, float, int]] = []
        pending = list(routes)
        deadline = revoked_at + 15
        while pending and time.monotonic() < deadline:
            for route in list(pending):
                sent = time.monotonic() - revoked_at
                status = route[0].get(route[1]).status_code
                seen.append((f"{route[0].base_url}{route[1]}", sent, status))
                if status == 401:
                    pending.remove(route)
        assert not pending, seen
        assert all(status in (200, 401) for _, _, status in seen), seen
        assert all(status == 401 for _, sent, status in seen if sent >= 1.0), seen
        calls = sim_chat_calls(stack)
        refused = other.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert sim_chat_calls(stack) == calls  # no provider call for it
    # the tenant's other key is untouched, and the key list tells which one was revoked
    with client(second_api, tenant["api_key"]) as first_key:
        assert first_key.get("/v1/tasks").status_code == 200
    with stack.admin_client() as admin:
        listed = {k["id"]: k for k in admin.get(f"/v1/admin/tenants/{tenant['id']}/keys").json()["data"]}
        again = admin.delete(f"/v1/admin/tenants/{tenant['id']}/keys/{new['id']}")
    assert listed[new["id"]]["revoked_at"] == revoked.json()["revoked_at"]
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]


def test_the_broker_refuses_a_revoked_key(stack: Stack) -> None:
    from tierbatch.base.messaging import SUBMIT_TASKS, make_producer
    from tierbatch.base.settings import Settings

    tenant = new_tenant(stack)
    with stack.admin_client() as admin:
        new = admin.post(f"/v1/admin/tenants/{tenant['id']}/keys").json()
        assert admin.delete(f"/v1/admin/tenants/{tenant['id']}/keys/{new['id']}").status_code == 200
    producer = make_producer(Settings(REDIS_URL=stack.redis_url,  # type: ignore[call-arg]
                                      TIERBATCH_REDIS_PREFIX=stack.redis_prefix))
    try:
        producer.send_task(SUBMIT_TASKS, args=[{"prompt": "revoked", "tier": "light"}, new["api_key"]])
    finally:
        producer.close()
    log_path = stack.processes["worker"].log_path
    assert log_path is not None
    line = f"invalid or revoked tenant key {new['api_key'][:10]}"
    wait_until(lambda: line in log_path.read_text(errors="replace"), 20, 0.1, "the worker's refusal")
    assert query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", tenant["id"]) == [(0,)]
    assert new["api_key"] not in log_path.read_text(errors="replace")  # only its public prefix is logged


def test_the_migration_keeps_every_key_handed_out_before_it(base_database_url: str) -> None:
    from alembic import command
    from sqlalchemy import create_engine, pool
    from sqlalchemy.orm import Session

    from tierbatch.migrations.runner import alembic_config, upgrade_to_head
    from tierbatch.tenants.store import grant_for_key, hash_api_key

    with scratch_database(base_database_url, prefix="tierbatch_keys_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0007")
        old_keys = {uuid.uuid4(): f"tb_old-{n}-{uuid.uuid4().hex}" for n in range(3)}
        with psycopg.connect(psycopg_dsn(url)) as conn:
            for tenant_id, key in old_keys.items():
                conn.execute("INSERT INTO tenants (id, name, api_key_hash, api_key_prefix) VALUES (%s, %s, %s, %s)",
                             (tenant_id, "old", hash_api_key(key), key[:10]))
        upgrade_to_head(url)
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with Session(engine) as session:
                for tenant_id, key in old_keys.items():
                    grant = grant_for_key(session, key)
                    assert grant is not None and grant.tenant_id == tenant_id
                    assert grant.requests_per_minute is None and grant.tokens_per_minute is None
        finally:
            engine.dispose()
        command.downgrade(config, "0007")  # and back: each tenant gets its key again
        with psycopg.connect(psycopg_dsn(url)) as conn:
            rows: dict[uuid.UUID, str] = dict(conn.execute("SELECT id, api_key_hash FROM tenants").fetchall())
        assert rows == {tenant_id: hash_api_key(key) for tenant_id, key in old_keys.items()}
        upgrade_to_head(url)


# --- rate limits -----------------------------------------------------------------------------------


def test_patch_changes_only_the_fields_it_names(stack: Stack) -> None:
    tenant = new_tenant(stack)
    path = f"/v1/admin/tenants/{tenant['id']}"
    with stack.admin_client() as admin:
        assert admin.patch(path, json={"monthly_budget_usd": "50"}).json()["monthly_budget_usd"] == "50"
        def fields(answer: httpx.Response) -> tuple[Any, ...]:
            body = answer.json()
            return body["monthly_budget_usd"], body["requests_per_minute"], body["tokens_per_minute"]

        assert fields(admin.patch(path, json={"requests_per_minute": 100})) == ("50", 100, None)
        assert fields(admin.patch(path, json={"tokens_per_minute": 5000})) == ("50", 100, 5000)
        assert fields(admin.patch(path, json={"requests_per_minute": None})) == ("50", None, 5000)
        assert fields(admin.patch(path, json={})) == ("50", None, 5000)
        for bad in ({"requests_per_minute": 0}, {"tokens_per_minute": -1}, {"requests_per_minute": "many"},
                    {"requests_per_minute": 10**12}, {"burst": 3}):
            refused = admin.patch(path, json=bad)
            assert refused.status_code == 422 and refused.json()["error"]["param"] == next(iter(bad)), bad
    stored = query(stack, "SELECT monthly_budget_usd, requests_per_minute, tokens_per_minute FROM tenants "
                   "WHERE id = %s", tenant["id"])
    assert stored == [(Decimal("50"), None, 5000)]


def _assert_rate_limited(response: httpx.Response, openai_surface: bool, kind: str) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 120
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["param"] is None and error["message"]
    assert error["type"] == (kind if openai_surface else "rate_limit_error")


def test_requests_per_minute_429_on_both_surfaces_before_any_provider_call(sim_reset: Stack,
                                                                          second_api: str) -> None:
    stack = sim_reset
    tenant = new_tenant(stack)
    with stack.admin_client() as admin:
        assert admin.patch(f"/v1/admin/tenants/{tenant['id']}", json={"requests_per_minute": 3}).status_code == 200
    with client(stack.api_url, tenant["api_key"]) as main, client(second_api, tenant["api_key"]) as other:
        # three requests, spread over two processes and both surfaces: one budget
        assert main.get("/v1/tasks").status_code == 200
        assert other.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert main.get("/v1/models").status_code == 200
        calls = sim_chat_calls(stack)
        _assert_rate_limited(other.post("/v1/chat/completions", json=CHAT), True, "requests")
        _assert_rate_limited(main.post("/v1/chat/completions", json={**CHAT, "stream": True}), True, "requests")
        _assert_rate_limited(main.get("/v1/tasks"), False, "requests")
        _assert_rate_limited(other.post("/v1/tasks", json={"prompt": "over the limit"}), False, "requests")
        assert sim_chat_calls(stack) == calls
    rows = query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", tenant["id"])
    assert rows == [(1,)]  # the one chat completion admitted; nothing stored for the refused ones
    # another tenant is not affected
    with client(stack.api_url, new_tenant(stack, "neighbour")["api_key"]) as neighbour:
        assert neighbour.get("/v1/tasks").status_code == 200


def test_tokens_per_minute_429_on_both_surfaces_before_any_provider_call(sim_reset: Stack) -> None:
    stack = sim_reset
    chat_tenant, task_tenant = new_tenant(stack), new_tenant(stack)
    with stack.admin_client() as admin:
        for tenant in (chat_tenant, task_tenant):
            patched = admin.patch(f"/v1/admin/tenants/{tenant['id']}", json={"tokens_per_minute": 100})
            assert patched.status_code == 200
    prompt = "word " * 50  # 250 bytes of prompt: about 63 tokens, so one call fits in 100 and two do not
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    with client(stack.api_url, chat_tenant["api_key"]) as chat_client:
        assert chat_client.post("/v1/chat/completions", json=body).status_code == 200
        calls = sim_chat_calls(stack)
        _assert_rate_limited(chat_client.post("/v1/chat/completions", json=body), True, "tokens")
        huge = {**body, "messages": [{"role": "user", "content": "x" * 2000}]}  # over the whole minute's limit
        _assert_rate_limited(chat_client.post("/v1/chat/completions", json=huge), True, "tokens")
        assert sim_chat_calls(stack) == calls
    with client(stack.api_url, task_tenant["api_key"]) as task_client:
        assert task_client.post("/v1/tasks", json={"prompt": prompt, "tier": "light"}).status_code == 202
        _assert_rate_limited(task_client.post("/v1/tasks", json={"prompt": prompt, "tier": "light"}), False,
                             "tokens")
    assert query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", task_tenant["id"]) == [(1,)]
    assert query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", chat_tenant["id"]) == [(1,)]


# --- failed authentications and hostile header values ---------------------------------------------


def test_failed_authentications_are_limited_per_address(stack: Stack, second_api: str) -> None:
    tenant = new_tenant(stack)
    address = fresh_address()
    for n in range(SECOND_API_FAILED_AUTH_PER_MINUTE):
        with client(second_api, f"tb_guess-{n}-{uuid.uuid4().hex}", address) as guess:
            assert guess.get("/v1/tasks" if n % 2 else "/v1/models").status_code == 401
    with client(second_api, "tb_one-more-guess", address) as guess:
        _assert_rate_limited(guess.get("/v1/tasks"), False, "failed_authentications")
        _assert_rate_limited(guess.get("/v1/models"), True, "failed_authentications")
    with client(second_api, "wrong-admin-token-" + "x" * 32, address) as admin_guess:
        assert admin_guess.get(f"/v1/admin/tenants/{tenant['id']}/keys").status_code == 429
    # a right key or admin token still passes from that address: guesses cannot lock its users out
    with client(second_api, tenant["api_key"], address) as valid:
        assert valid.get("/v1/tasks").status_code == 200
    with client(second_api, ADMIN_TOKEN, address) as admin:
        assert admin.get(f"/v1/admin/tenants/{tenant['id']}/keys").status_code == 200
    # another address is unaffected
    with client(second_api, "tb_guess-elsewhere") as elsewhere:
        assert elsewhere.get("/v1/tasks").status_code == 401


@pytest.mark.parametrize("value", [
    "Bearer clé-ünïcode".encode(),  # UTF-8 bytes (the server sees Latin-1 characters)
    b"Bearer \xff\xfe\xe9t\xe9",  # not UTF-8 at all
    b"Bearer " + b"\xe9" * 40,  # as long as the admin token, non-ASCII
    b"Bearer " + b"k" * 6000,  # very long
    b"Bearer tb_" + "é".encode() * 30,
    b"bearer",
    b"Basic dGVzdDp0ZXN0",
], ids=["utf8", "latin1", "admin-length", "long", "tb-prefixed", "blank", "basic"])
def test_any_authorization_value_is_401_never_500(stack: Stack, value: bytes) -> None:
    tenant = new_tenant(stack)
    with httpx.Client(base_url=stack.api_url, timeout=30, headers={b"Authorization": value},
                      transport=httpx.HTTPTransport(local_address=fresh_address())) as hostile:
        answers = {
            "admin": hostile.get(f"/v1/admin/tenants/{tenant['id']}/keys"),
            "admin-create": hostile.post("/v1/admin/tenants", json={"name": "x"}),
            "tenant": hostile.get("/v1/tasks"),
            "costs": hostile.get("/v1/costs"),
            "chat": hostile.post("/v1/chat/completions", json=CHAT),
            "models": hostile.get("/v1/models"),
            "batches": hostile.get("/v1/batches"),
        }
    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 401)
    assert all(r.json()["error"]["message"] for r in answers.values())


# --- the admin token's length ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["api", "--port", "0"], ["worker"], ["beat"], ["migrate"]])
def test_every_process_refuses_a_short_admin_token(stack: Stack, tmp_path: Path, command: list[str]) -> None:
    short = "short-admin-token-" + "x" * (MIN_ADMIN_TOKEN_CHARS - 19)  # 31 characters
    assert len(short) == MIN_ADMIN_TOKEN_CHARS - 1
    if command[0] == "beat":
        command = [*command, "--schedule", str(tmp_path / "beat-schedule")]
    done = subprocess.run(python_module("tierbatch.cli", *command), env={**os.environ, **stack.env,
                                                               "TIERBATCH_ADMIN_TOKEN": short},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    said = " ".join(done.stderr.split())  # the console wraps long lines
    assert "TIERBATCH_ADMIN_TOKEN" in said and f"at least {MIN_ADMIN_TOKEN_CHARS}" in said, said
    assert short not in done.stdout + done.stderr  # the value itself is never printed
    assert "Traceback" not in done.stderr


def test_up_refuses_a_short_admin_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "TIERBATCH_CONFIG")}
    args = python_module("tierbatch.cli", "up", "--dir", str(tmp_path / "state"), "--api-port", str(free_port()),
                         "--simulator-port", str(free_port()))
    done = subprocess.run(args, env={**env, "TIERBATCH_ADMIN_TOKEN": "x" * 20}, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert f"at least {MIN_ADMIN_TOKEN_CHARS}" in " ".join((done.stdout + done.stderr).split())
    assert not (tmp_path / "state" / "pg").exists()  # refused before starting anything
