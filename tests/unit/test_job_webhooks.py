"""Job webhooks without services: the webhook_url field, appends by name, the signed body, the beat entry."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tierbatch.api.errors import status_of
from tierbatch.base.config import AppConfig
from tierbatch.base.errors import Conflict, InvalidInput
from tierbatch.base.messaging import (
    ALL_QUEUES,
    JOB_WEBHOOK,
    JOB_WEBHOOK_TICK,
    QUEUE_DISPATCH,
    QUEUE_WEBHOOKS,
    SCHEDULE_WEBHOOK,
    TASK_ROUTES,
)
from tierbatch.base.states import RequestedTier
from tierbatch.db.models import Job
from tierbatch.jobs.read import JobSummary
from tierbatch.jobs.requests import parse_job_request
from tierbatch.jobs.store import _settings_for_append
from tierbatch.jobs.webhooks import encode_payload, job_payload
from tierbatch.webhooks.delivery import JOBS, SCHEDULE_RUNS
from tierbatch.webhooks.signing import new_secret, signed_headers
from tierbatch.webhooks.targets import check_webhook_url
from tierbatch.worker.app import beat_schedule

LIMIT = 1 << 20
ITEMS = [{"id": "a", "text": "hello"}]


def parse(**fields: Any) -> Any:
    return parse_job_request({**fields, "items": ITEMS}, LIMIT)


@pytest.mark.parametrize("url", ["https://example.com/hooks/jobs", "http://127.0.0.1:8080/h?x=1",
                                 "https://user@hooks.internal:443/a/b"])
def test_http_and_https_urls_are_accepted(url: str) -> None:
    assert check_webhook_url(url) == url
    assert parse(webhook_url=url).webhook_url == url


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/hook", "http://", "", "   ", 42, ["x"],
                                 {"url": "https://example.com"}, "https://example.com/" + "x" * 3000,
                                 "http://exa mple.com/"])
def test_bad_urls_are_a_422_naming_webhook_url(url: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(webhook_url=url)
    assert caught.value.param == "webhook_url" and status_of(caught.value) == 422
    assert caught.value.message.startswith("webhook_url:")


def test_no_webhook_url_is_none_and_it_is_not_a_task_setting() -> None:
    assert parse().webhook_url is None and parse(webhook_url=None).webhook_url is None
    request = parse(name="n", webhook_url="https://example.com/h", tier="light")
    assert request.given == frozenset({"tier"})


def stored_job(webhook_url: str | None) -> Job:
    return Job(id=uuid.uuid4(), tenant_id=uuid.uuid4(), name="n", task_type="general",
               requested_tier=RequestedTier.AUTO, urgent=False, deadline=None,
               spec={"params": {}, "system": None, "template": "{text}", "labels": None, "metadata": {}},
               webhook_url=webhook_url)


def test_an_append_may_repeat_or_leave_out_the_webhook_url_but_not_change_it() -> None:
    job = stored_job("https://example.com/h")
    _settings_for_append(job, parse(name="n", webhook_url="https://example.com/h"))
    _settings_for_append(job, parse(name="n"))
    with pytest.raises(Conflict) as caught:
        _settings_for_append(job, parse(name="n", webhook_url="https://example.com/other"))
    assert caught.value.param == "webhook_url" and status_of(caught.value) == 409
    with pytest.raises(Conflict) as late:
        _settings_for_append(stored_job(None), parse(name="n", webhook_url="https://example.com/h"))
    assert status_of(late.value) == 409
    assert late.value.param == "webhook_url" and "no webhook_url" in late.value.message


def test_the_body_is_the_job_summary_as_compact_json_and_signs_as_sent() -> None:
    job = stored_job("https://example.com/h")
    job.created_at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    finished = datetime(2030, 1, 2, 3, 9, 0, tzinfo=UTC)
    summary = JobSummary(counts={"failed": 1, "succeeded": 9}, task_count=10, status="completed",
                         finished_at=finished, cost_usd=Decimal("0.0012300000"),
                         baseline_cost_usd=Decimal("0.0200000000"), savings_usd=Decimal("0.0187700000"),
                         shadow_cost_usd=Decimal(0), unpriced_requests=0)
    payload = job_payload(job, summary)
    assert payload["event"] == "job.finished" and payload["job_id"] == str(job.id) and payload["name"] == "n"
    assert payload["counts"] == {"failed": 1, "succeeded": 9} and payload["task_count"] == 10
    assert (payload["cost_usd"], payload["baseline_cost_usd"], payload["savings_usd"]) == ("0.00123", "0.02",
                                                                                          "0.01877")
    assert payload["finished_at"] == finished.isoformat() and payload["created_at"] == job.created_at.isoformat()
    assert payload["results_url"] == f"/v1/jobs/{job.id}/results"
    text = encode_payload(payload)
    assert ", " not in text and json.loads(text) == payload
    secret = new_secret()
    headers = signed_headers(secret, "msg_x", datetime.now(UTC), text.encode())
    assert Webhook(secret).verify(text.encode(), headers) == payload


def test_the_two_outboxes_send_their_own_event() -> None:
    assert (SCHEDULE_RUNS.event, JOBS.event) == ("schedule_run.finished", "job.finished")
    assert SCHEDULE_RUNS.constraint != JOBS.constraint


def test_the_beat_runs_the_job_webhook_tick_and_the_posts_go_to_a_queue_of_their_own() -> None:
    config = AppConfig.model_validate({
        "providers": {"sim": {"base_url": "http://127.0.0.1:1/v1"}},
        "tiers": {"light": {"provider": "sim", "model": "small"}, "complex": {"provider": "sim", "model": "big"}},
    })
    entry = beat_schedule(config)["job-webhooks-tick"]
    assert entry["task"] == JOB_WEBHOOK_TICK
    assert TASK_ROUTES[JOB_WEBHOOK_TICK] == {"queue": QUEUE_DISPATCH}
    assert TASK_ROUTES[JOB_WEBHOOK] == TASK_ROUTES[SCHEDULE_WEBHOOK] == {"queue": QUEUE_WEBHOOKS}
    assert QUEUE_WEBHOOKS in ALL_QUEUES  # what `tierbatch worker` consumes by default
