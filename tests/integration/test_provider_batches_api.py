"""`GET /v1/provider-batches` and `tierbatch batches` against the session stack: two tenants' light work
through real provider batches at the simulator; what each tenant sees of them (only batches holding its
tasks, only its own lines), what the operator sees, the timestamps, filters, pages and hostile input.

The batches the module builds (ids read from the tasks' rows, the ground truth):

- shared: one batch holding A's 3 tasks and B's 2 (the assembler is held off by its own advisory lock while
  both tenants submit, so one claim takes all five);
- held: A's 3 tasks in a batch kept in progress at the simulator, seen while pending; one of them has a
  deadline the batch cannot meet and is escalated to an immediate call; then the batch is cancelled there
  before any line was answered: the other 2 lines go back to wait and leave it;
- retry: the batch those 2 lines are sent again in (A only);
- b_only: B's single task in a batch of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.conftest import SIM_BATCH_DEFAULTS, SIM_DEFAULTS
from tests.support.procs import python_module, wait_until
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration

ASSEMBLE_LOCK = "tierbatch.assemble:sim/gpt-4o-mini"  # the light tier's group in the test config
TIMEOUT = 120.0


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute(sql, params).fetchall()


def light_task(tag: str) -> dict[str, Any]:
    return {"prompt": f"Classify ticket {tag}-{uuid.uuid4().hex}. Labels: billing, account, bug",
            "task_type": "classification"}


def submit_light(stack: Stack, key: str, count: int, tag: str, *extra: dict[str, Any]) -> list[str]:
    tasks = [light_task(f"{tag}-{i}") for i in range(count)] + list(extra)
    with stack.client(key) as client:
        response = client.post("/v1/tasks", json={"tasks": tasks})
    assert response.status_code == 202, response.text
    return [task["id"] for task in response.json()["data"]]


def wait_statuses(stack: Stack, task_ids: list[str], statuses: set[str], what: str) -> None:
    def reached() -> bool:
        rows = query(stack, "SELECT status::text FROM tasks WHERE id = ANY(%s::uuid[])", task_ids)
        return len(rows) == len(task_ids) and all(status in statuses for (status,) in rows)

    try:
        wait_until(reached, TIMEOUT, 0.1, what)
    except TimeoutError:
        rows = query(stack, "SELECT id, status::text, batch_id, error FROM tasks WHERE id = ANY(%s::uuid[])", task_ids)
        raise AssertionError(f"{what}: {rows}\n{stack.processes['worker'].log_text()[-4000:]}") from None


def batch_ids_of(stack: Stack, task_ids: list[str]) -> set[str]:
    return {str(batch) for (batch,) in query(stack, "SELECT DISTINCT batch_id FROM tasks WHERE id = ANY(%s::uuid[])",
                                              task_ids)}


def batch_done(stack: Stack, batch_id: str) -> bool:
    return query(stack, "SELECT status::text FROM provider_batches WHERE id = %s", batch_id) == [("done",)]


@dataclass(frozen=True)
class Tenant:
    id: str
    key: str


@dataclass(frozen=True)
class Built:
    a: Tenant
    b: Tenant
    shared: str
    held: str
    retry: str
    b_only: str
    held_while_pending: dict[str, Any]  # A's view of the held batch while the provider had it


def _configure_simulator(stack: Stack, batch: dict[str, Any] | None = None) -> None:
    stack.sim("POST", "/_sim/config", {"models": SIM_DEFAULTS, "batch": {**SIM_BATCH_DEFAULTS, **(batch or {})}})


@pytest.fixture(scope="module")
def built(stack: Stack) -> Iterator[Built]:
    _configure_simulator(stack)
    a, b = (Tenant(*stack.new_tenant(f"pb-{name}")) for name in ("a", "b"))

    # shared: hold the assembler off this group until both tenants' tasks wait, so one claim takes them all
    with psycopg.connect(psycopg_dsn(stack.database_url), autocommit=True) as lock:
        lock.execute("SELECT pg_advisory_lock(hashtext(%s))", (ASSEMBLE_LOCK,))
        try:
            shared_a = submit_light(stack, a.key, 3, "shared-a")
            shared_b = submit_light(stack, b.key, 2, "shared-b")
            wait_statuses(stack, shared_a + shared_b, {"waiting_batch"}, "the shared tasks waiting")
        finally:
            lock.execute("SELECT pg_advisory_unlock(hashtext(%s))", (ASSEMBLE_LOCK,))
    wait_statuses(stack, shared_a + shared_b, {"succeeded"}, "the shared batch served")
    (shared,) = batch_ids_of(stack, shared_a + shared_b)  # one batch holds both tenants' tasks
    wait_until(lambda: batch_done(stack, shared), TIMEOUT, 0.1, "the shared batch done")

    # held: kept in progress at the simulator, read while pending; its task with a deadline is escalated
    # (a deadline past the batch path's expected turnaround, so it is batched first: test config 30 s, 5 s)
    _configure_simulator(stack, {"in_progress_seconds": 600})
    deadline = (datetime.now(UTC) + timedelta(seconds=40)).isoformat()
    *held_tasks, urgent_task = submit_light(stack, a.key, 2, "held", {**light_task("deadline"), "deadline": deadline})
    wait_statuses(stack, [*held_tasks, urgent_task], {"in_batch"}, "the held tasks in a batch")
    (held,) = batch_ids_of(stack, [*held_tasks, urgent_task])

    def submitted() -> dict[str, Any] | None:
        with stack.client(a.key) as client:
            body: dict[str, Any] = client.get(f"/v1/provider-batches/{held}").json()
        return body if body.get("provider_status") == "in_progress" else None

    held_while_pending: dict[str, Any] = wait_until(submitted, TIMEOUT, 0.1, "the held batch in progress")  # type: ignore[assignment]
    wait_statuses(stack, [urgent_task], {"succeeded"}, "the task with a deadline served immediately")
    _configure_simulator(stack)  # the retry batch goes through at once
    stack.sim("POST", f"/v1/batches/{held_while_pending['provider_batch_id']}/cancel")
    wait_statuses(stack, held_tasks, {"succeeded"}, "the held tasks served by another batch")
    (retry,) = batch_ids_of(stack, held_tasks)
    wait_until(lambda: batch_done(stack, held) and batch_done(stack, retry), TIMEOUT, 0.1, "held and retry done")

    b_tasks = submit_light(stack, b.key, 1, "b-only")
    wait_statuses(stack, b_tasks, {"succeeded"}, "B's own batch served")
    (b_only,) = batch_ids_of(stack, b_tasks)
    wait_until(lambda: batch_done(stack, b_only), TIMEOUT, 0.1, "B's batch done")
    yield Built(a, b, shared, held, retry, b_only, held_while_pending)
    _configure_simulator(stack)


def get(stack: Stack, key: str, path: str, **params: Any) -> httpx.Response:
    with stack.client(key) as client:
        return client.get(path, params=params)


def admin_get(stack: Stack, path: str, **params: Any) -> httpx.Response:
    with stack.admin_client() as client:
        return client.get(path, params=params)


def every_page(fetch: Any, limit: int, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        response = fetch(limit=limit, **params, **({"after": after} if after else {}))
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["data"]) <= limit
        rows += page["data"]
        if not page["has_more"]:
            assert page["next"] is None
            return rows
        assert page["next"] == page["data"][-1]["id"]
        after = page["next"]


def moment(value: str) -> datetime:
    return datetime.fromisoformat(value)


LINE_KEYS = {"succeeded", "failed", "pending", "escalated", "retried"}
FIELDS = {"id", "object", "provider", "model", "provider_batch_id", "status", "provider_status", "request_count",
          "line_counts", "created_at", "submitted_at", "completed_at", "ingested_at", "turnaround_seconds", "error"}


def test_a_tenant_sees_only_batches_holding_its_tasks_with_its_own_lines(stack: Stack, built: Built) -> None:
    listed_a = get(stack, built.a.key, "/v1/provider-batches").json()
    listed_b = get(stack, built.b.key, "/v1/provider-batches").json()
    assert [row["id"] for row in listed_a["data"]] == [built.retry, built.held, built.shared]  # newest first
    assert [row["id"] for row in listed_b["data"]] == [built.b_only, built.shared]
    assert listed_a["has_more"] is False and listed_a["next"] is None

    shared_a, shared_b = listed_a["data"][2], listed_b["data"][1]
    assert set(shared_a) == FIELDS and set(shared_a["line_counts"]) == LINE_KEYS
    assert shared_a["object"] == "provider_batch"
    assert (shared_a["provider"], shared_a["model"], shared_a["status"], shared_a["provider_status"]) == (
        "sim", "gpt-4o-mini", "done", "completed")
    assert shared_a["provider_batch_id"] and shared_a["provider_batch_id"] == shared_b["provider_batch_id"]
    # each counts its own lines only; the batch's size (5) would tell of the other tenant
    assert shared_a["request_count"] == 3 and shared_b["request_count"] == 2
    assert shared_a["line_counts"] == {"succeeded": 3, "failed": 0, "pending": 0, "escalated": 0, "retried": None}
    assert shared_b["line_counts"] == {"succeeded": 2, "failed": 0, "pending": 0, "escalated": 0, "retried": None}
    assert get(stack, built.a.key, f"/v1/provider-batches/{built.shared}").json() == shared_a
    assert shared_a["error"] is None
    # of the held batch A still has the escalated line; the two that left it are not counted for a tenant
    held_a = listed_a["data"][1]
    assert (held_a["status"], held_a["provider_status"], held_a["request_count"]) == ("done", "cancelled", 1)
    assert held_a["line_counts"] == {"succeeded": 0, "failed": 0, "pending": 0, "escalated": 1, "retried": None}
    assert listed_a["data"][0]["line_counts"] == {"succeeded": 2, "failed": 0, "pending": 0, "escalated": 0,
                                                  "retried": None}


def test_another_tenants_batch_is_not_found(stack: Stack, built: Built) -> None:
    never = str(uuid.uuid4())
    unknown = get(stack, built.a.key, f"/v1/provider-batches/{never}")
    assert unknown.status_code == 404
    for key, batch in ((built.b.key, built.retry), (built.b.key, built.held), (built.a.key, built.b_only)):
        response = get(stack, key, f"/v1/provider-batches/{batch}")
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["type"] == "not_found_error" and error["param"] == "id"
        # worded like an id that never existed: nothing tells the batch is someone else's
        assert error == {**unknown.json()["error"], "message": unknown.json()["error"]["message"].replace(never, batch)}


def test_the_operator_sees_every_batch_with_all_its_lines(stack: Stack, built: Built) -> None:
    listed = {row["id"]: row for row in every_page(lambda **p: admin_get(stack, "/v1/provider-batches", **p), 1000)}
    assert {built.shared, built.held, built.retry, built.b_only} <= set(listed)
    shared = listed[built.shared]
    assert shared["request_count"] == 5
    assert shared["line_counts"] == {"succeeded": 5, "failed": 0, "pending": 0, "escalated": 0, "retried": 0}
    held = listed[built.held]
    # cancelled at the provider before any line was answered: one line escalated, two went to the retry batch
    assert (held["status"], held["provider_status"], held["request_count"]) == ("done", "cancelled", 3)
    assert held["line_counts"] == {"succeeded": 0, "failed": 0, "pending": 0, "escalated": 1, "retried": 2}
    assert listed[built.retry]["line_counts"]["succeeded"] == 2
    assert listed[built.b_only]["request_count"] == 1
    assert admin_get(stack, f"/v1/provider-batches/{built.held}").json() == held
    # one tenant's view, on the operator's request: what that tenant sees
    as_a = admin_get(stack, "/v1/provider-batches", tenant_id=built.a.id).json()
    assert as_a == get(stack, built.a.key, "/v1/provider-batches").json()
    assert admin_get(stack, f"/v1/provider-batches/{built.b_only}", tenant_id=built.a.id).status_code == 404


def test_a_pending_batch_has_no_completion_yet(built: Built) -> None:
    pending = built.held_while_pending
    assert (pending["status"], pending["provider_status"]) == ("submitted", "in_progress")
    assert pending["request_count"] == 3
    assert pending["line_counts"] == {"succeeded": 0, "failed": 0, "pending": 3, "escalated": 0, "retried": None}
    assert pending["submitted_at"] is not None and moment(pending["created_at"]) <= moment(pending["submitted_at"])
    assert pending["completed_at"] is None and pending["ingested_at"] is None and pending["turnaround_seconds"] is None


def test_timestamps_are_in_order_and_turnaround_matches(stack: Stack, built: Built) -> None:
    for batch in (built.shared, built.held, built.retry, built.b_only):
        row = admin_get(stack, f"/v1/provider-batches/{batch}").json()
        created, submitted = moment(row["created_at"]), moment(row["submitted_at"])
        completed, ingested = moment(row["completed_at"]), moment(row["ingested_at"])
        assert created <= submitted <= completed <= ingested, row
        assert row["turnaround_seconds"] == pytest.approx((completed - submitted).total_seconds(), abs=1e-6)
        assert row["turnaround_seconds"] > 0


def test_filters(stack: Stack, built: Built) -> None:
    def ids(key: str, **params: Any) -> list[str]:
        response = get(stack, key, "/v1/provider-batches", **params)
        assert response.status_code == 200, response.text
        return [row["id"] for row in response.json()["data"]]

    a = built.a.key
    assert ids(a, status="done") == [built.retry, built.held, built.shared]
    assert ids(a, status="submitted") == [] and ids(a, status="failed") == []
    assert ids(a, provider="sim", model="gpt-4o-mini") == [built.retry, built.held, built.shared]
    assert ids(a, provider="other") == [] and ids(a, model="gpt-4o") == []
    admin = [row["id"] for row in admin_get(stack, "/v1/provider-batches", tenant_id=built.b.id, status="done",
                                            limit=1000).json()["data"]]
    assert admin == [built.b_only, built.shared]


def test_pages_cover_every_row_once_newest_first(stack: Stack, built: Built) -> None:
    whole = admin_get(stack, "/v1/provider-batches", limit=1000).json()
    assert whole["has_more"] is False  # the session's batches fit one page of 1000
    by_two = every_page(lambda **p: admin_get(stack, "/v1/provider-batches", **p), 2)
    assert [row["id"] for row in by_two] == [row["id"] for row in whole["data"]]
    assert len({row["id"] for row in by_two}) == len(by_two)
    keys = [(moment(row["created_at"]), row["id"]) for row in by_two]
    assert keys == sorted(keys, reverse=True)
    by_one = every_page(lambda **p: get(stack, built.a.key, "/v1/provider-batches", **p), 1)
    assert [row["id"] for row in by_one] == [built.retry, built.held, built.shared]


@pytest.mark.parametrize(("params", "param"), [
    ({"status": "bogus"}, "status"), ({"status": "in_batch"}, "status"),
    ({"limit": 10**12}, "limit"), ({"limit": 1001}, "limit"), ({"limit": 0}, "limit"), ({"limit": "x"}, "limit"),
    ({"after": "garbage"}, "after"), ({"after": "' OR 1=1 --"}, "after"), ({"after": "x" * 5000}, "after"),
    ({"after": str(uuid.uuid4())}, "after"),
    ({"tenant_id": str(uuid.uuid4())}, "tenant_id"),  # a tenant may not choose another tenant's view
])
def test_hostile_listing_parameters_are_refused_naming_the_field(stack: Stack, built: Built, params: dict[str, Any],
                                                                 param: str) -> None:
    response = get(stack, built.a.key, "/v1/provider-batches", **params)
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["param"] == param


def test_a_cursor_from_another_tenants_listing_is_refused_like_garbage(stack: Stack, built: Built) -> None:
    theirs = get(stack, built.a.key, "/v1/provider-batches", after=built.b_only)
    unknown = get(stack, built.a.key, "/v1/provider-batches", after=str(uuid.uuid4()))
    assert theirs.status_code == unknown.status_code == 400
    assert theirs.json()["error"]["param"] == "after"


@pytest.mark.parametrize("batch_id", ["not-a-uuid", "1' OR '1'='1", "x" * 3000, "%20", "0" * 32 + "0"])
def test_a_malformed_id_is_not_found(stack: Stack, built: Built, batch_id: str) -> None:
    response = get(stack, built.a.key, f"/v1/provider-batches/{batch_id}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["param"] == "id"


def test_the_operator_filter_by_tenant_is_checked(stack: Stack, built: Built) -> None:
    response = admin_get(stack, "/v1/provider-batches", tenant_id="not-a-uuid")
    assert response.status_code == 422 and response.json()["error"]["param"] == "tenant_id"
    nobody = admin_get(stack, "/v1/provider-batches", tenant_id=str(uuid.uuid4()))
    assert nobody.status_code == 200 and nobody.json()["data"] == []


def test_no_key_or_a_bad_key_is_refused(stack: Stack, built: Built) -> None:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        assert client.get("/v1/provider-batches").status_code == 401
        assert client.get(f"/v1/provider-batches/{built.shared}",
                          headers={"Authorization": "Bearer tb-not-a-key"}).status_code == 401


# --- command line ---------------------------------------------------------------------------------------

def run_cli(stack: Stack, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.env, "TIERBATCH_API_URL": stack.api_url, "COLUMNS": "250"}
    env.pop("TIERBATCH_API_KEY", None)
    if key is not None:
        env["TIERBATCH_API_KEY"] = key
    return subprocess.run(python_module("tierbatch.cli", "batches", *args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_lists_and_shows_batches(stack: Stack, built: Built) -> None:
    listed = run_cli(stack, "list", "--json", key=built.a.key)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["data"] == get(stack, built.a.key, "/v1/provider-batches").json()["data"]
    one = run_cli(stack, "list", "--json", "--limit", "1", key=built.a.key)
    body = json.loads(one.stdout)
    assert [row["id"] for row in body["data"]] == [built.retry] and body["has_more"] is True
    filtered = json.loads(run_cli(stack, "list", "--json", "--status", "done", "--provider", "sim", "--model",
                                  "gpt-4o-mini", key=built.b.key).stdout)
    assert [row["id"] for row in filtered["data"]] == [built.b_only, built.shared]

    shown = run_cli(stack, "show", built.shared, "--json", key=built.b.key)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == get(stack, built.b.key, f"/v1/provider-batches/{built.shared}").json()
    table = run_cli(stack, "show", built.shared, key=built.b.key)
    assert table.returncode == 0 and built.shared in table.stdout and "turnaround" in table.stdout
    rows = run_cli(stack, "list", key=built.a.key)
    assert rows.returncode == 0 and built.retry in rows.stdout and built.b_only not in rows.stdout

    # without a tenant key, the admin token: every batch, full counts
    admin = json.loads(run_cli(stack, "show", built.held, "--json").stdout)
    assert admin["line_counts"]["retried"] == 2
    assert built.held in {row["id"] for row in json.loads(run_cli(stack, "list", "--json", "--limit", "1000")
                                                           .stdout)["data"]}

    missing = run_cli(stack, "show", built.b_only, key=built.a.key)
    assert missing.returncode == 2 and "404" in missing.stderr
    bad = run_cli(stack, "list", "--status", "bogus", key=built.a.key)
    assert bad.returncode == 2 and "status" in bad.stderr
