"""Tenant routing rules on the bulk paths, through the real stack: a rule set with
`PUT /v1/routes/{task_type}` routes a tenant's `auto` tasks of that type in `POST /v1/jobs` (and NDJSON
item uploads) and in Batch API facade lines, before config `[routing]`; an explicit tier still wins, and
a tenant without the rule keeps config routing."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import psycopg
import pytest
from openai import OpenAI

from tests.integration.test_jobs_api import job_tasks, wait_for_job
from tests.support.procs import wait_until
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration

RULE_REASON = "routing rule for 'classification' (api)"
CONFIG_REASON = "config routing for 'classification'"
TEXTS = ["I was charged twice", "The app will not start", "Change my e-mail address"]


def items(prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "text": text} for i, text in enumerate(TEXTS)]


def promote(client: httpx.Client) -> None:
    answer = client.put("/v1/routes/classification", json={"tier": "complex", "reason": "needs the big model"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["tier"], answer.json()["source"]) == ("complex", "api")


def tiers(client: httpx.Client, job_id: str) -> set[tuple[str, str]]:
    return {(t["tier"], t["tier_reason"]) for t in job_tasks(client, job_id)}


def test_a_rule_routes_a_tenants_auto_jobs_and_uploads(sim_reset: Stack) -> None:
    stack = sim_reset
    with stack.client(stack.new_tenant_key("ruled")) as ruled, stack.client(stack.new_tenant_key("plain")) as plain:
        promote(ruled)
        job = {"task_type": "classification", "tier": "auto", "system": "Sort the ticket.",
               "template": "Ticket: {text}"}
        ruled_job = ruled.post("/v1/jobs", json={**job, "items": items("r")})
        plain_job = plain.post("/v1/jobs", json={**job, "items": items("p")})
        explicit_job = ruled.post("/v1/jobs", json={**job, "tier": "light", "items": items("e")})
        for answer in (ruled_job, plain_job, explicit_job):
            assert answer.status_code == 202, answer.text
        ruled_id, plain_id = ruled_job.json()["id"], plain_job.json()["id"]

        assert tiers(ruled, ruled_id) == {("complex", RULE_REASON)}
        assert tiers(plain, plain_id) == {("light", CONFIG_REASON)}  # another tenant's rule is not theirs
        assert tiers(ruled, explicit_job.json()["id"]) == {("light", "explicit")}

        # items uploaded later to the job follow the rule too (one rule lookup per upload)
        upload = ruled.post(f"/v1/jobs/{ruled_id}/items", headers={"content-type": "application/x-ndjson"},
                            content="".join(json.dumps(i) + "\n" for i in items("u")).encode())
        assert upload.status_code == 202, upload.text
        assert tiers(ruled, ruled_id) == {("complex", RULE_REASON)}

        # the stored tier is what serves: complex tasks on the complex model, right away
        for client, job_id, model in ((ruled, ruled_id, "gpt-4o"), (plain, plain_id, "gpt-4o-mini")):
            wait_for_job(stack, client, job_id)
            done = job_tasks(client, job_id)
            assert {(t["status"], t["model"]) for t in done} == {("succeeded", model)}
        assert {t["mode"] for t in job_tasks(ruled, ruled_id)} == {"immediate"}
        assert {t["mode"] for t in job_tasks(plain, plain_id)} == {"batch"}


def facade_file(client: OpenAI) -> str:
    def line(custom_id: str, text: str, **metadata: str) -> str:
        body = {"model": "smart-select", "messages": [{"role": "user", "content": text}], "metadata": metadata}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})

    lines = [*(line(f"cls-{i}", text, task_type="classification") for i, text in enumerate(TEXTS)),
             line("cls-explicit", "Is this spam?", task_type="classification", tier="light"),
             line("general", "Say hello")]
    content = ("\n".join(lines) + "\n").encode()
    return client.files.create(file=("lines.jsonl", io.BytesIO(content)), purpose="batch").id


def batch_tasks(stack: Stack, batch_id: str) -> dict[str, tuple[str, str]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute("SELECT t.item_id, t.tier::text, t.tier_reason FROM tasks t JOIN client_batches b "
                            "ON b.job_id = t.job_id WHERE b.id = %s", (batch_id,)).fetchall()
    return {item: (tier, reason) for item, tier, reason in rows}


def test_a_rule_routes_a_tenants_facade_batch_lines(sim_reset: Stack) -> None:
    stack = sim_reset
    ruled_key, plain_key = stack.new_tenant_key("ruled"), stack.new_tenant_key("plain")
    with stack.client(ruled_key) as native:
        promote(native)
    batches: dict[str, str] = {}
    for name, key in (("ruled", ruled_key), ("plain", plain_key)):
        with OpenAI(base_url=stack.api_url + "/v1", api_key=key, max_retries=0, timeout=60) as client:
            batch = client.batches.create(input_file_id=facade_file(client), endpoint="/v1/chat/completions",
                                          completion_window="24h")
            batches[name] = batch.id

    ruled, plain = batch_tasks(stack, batches["ruled"]), batch_tasks(stack, batches["plain"])
    rule, config = ("complex", f"smart-select: {RULE_REASON}"), ("light", f"smart-select: {CONFIG_REASON}")
    assert {ruled[f"cls-{i}"] for i in range(len(TEXTS))} == {rule}
    assert {plain[f"cls-{i}"] for i in range(len(TEXTS))} == {config}
    for tasks in (ruled, plain):  # an explicit tier wins; other task types are untouched
        assert tasks["cls-explicit"] == ("light", "smart-select: explicit")
        assert tasks["general"][0] == "light" and tasks["general"][1].startswith("smart-select: auto: ")

    for name, key in (("ruled", ruled_key), ("plain", plain_key)):
        with OpenAI(base_url=stack.api_url + "/v1", api_key=key, max_retries=0, timeout=60) as client:
            def finished(batch_id: str = batches[name], sdk: OpenAI = client) -> Any:
                batch = sdk.batches.retrieve(batch_id)
                return batch if batch.status in {"completed", "failed", "cancelled", "expired"} else None

            done: Any = wait_until(finished, 60, 0.2, f"batch {batches[name]} done")
            assert done.status == "completed" and done.output_file_id is not None, done
            lines = [json.loads(raw) for raw in client.files.content(done.output_file_id).text.splitlines()]
            served = {line["custom_id"]: line["response"]["body"]["model"] for line in lines}
            expected = "gpt-4o" if name == "ruled" else "gpt-4o-mini"
            assert {served[f"cls-{i}"] for i in range(len(TEXTS))} == {expected}
            assert served["cls-explicit"] == served["general"] == "gpt-4o-mini"
