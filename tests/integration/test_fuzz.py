"""Fuzzing the running API from its own OpenAPI document (Schemathesis): no request, valid or not, with a
tenant key, the admin token, a wrong key or none, is ever answered with a 5xx or a dropped connection.

The requests come from Schemathesis's strategies for each operation of the document (valid ones and invalid
ones), driven by Hypothesis directly: the same requests on every run (a fixed seed), a few dozen per
operation, no shrinking, every failure collected and listed with a curl line to reproduce it and the
exceptions of the API's log, and a time budget for the whole run. The provider is the session's simulator,
so the calls that get through cost nothing real.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.integration.fuzz_openapi import NDJSON, body_gaps, completed
from tests.support.stack import ADMIN_TOKEN, Stack

pytestmark = pytest.mark.integration

SEED = 20261201
EXAMPLES_PER_OPERATION = 40
REQUEST_TIMEOUT = 30.0
TIME_BUDGET_SECONDS = 240  # the whole fuzz run; a hang or a slow path shows up as operations not fuzzed
# /metrics: open to any scraper by design, with the tenant label summed away (test_metrics.py)
PUBLIC = ("/healthz", "/readyz", "/openapi.json", "/docs", "/redoc", "/metrics")
# the fuzz traffic comes from addresses of its own (all of 127.0.0.0/8 is loopback), so a limit the API keeps
# per client address after failed authentications never reaches the other tests of the session
TRUSTED_ADDRESS = "127.0.0.71"
UNTRUSTED_ADDRESS = "127.0.0.72"


@dataclass(frozen=True)
class Identity:
    name: str
    authorization: str | None
    trusted: bool  # holds a valid credential for some route

    def headers(self) -> dict[str, str]:
        return {} if self.authorization is None else {"Authorization": self.authorization}


class _FromAddress(HTTPAdapter):
    """Connections from a chosen loopback address."""

    def __init__(self, address: str) -> None:
        self._address = address
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._address, 0)
        super().init_poolmanager(*args, **kwargs)


def _session(address: str) -> requests.Session:
    session = requests.Session()
    adapter = _FromAddress(address)
    session.mount("http://", adapter)
    return session


@dataclass
class FuzzWorld:
    tenant_key: str
    real_ids: dict[str, str]
    trusted: requests.Session
    untrusted: requests.Session
    # (operation label, identity name) -> status codes seen
    seen: dict[tuple[str, str], Counter[int]] = field(default_factory=dict)

    def identities(self, path: str) -> list[Identity]:
        tenant = Identity("tenant key", f"Bearer {self.tenant_key}", trusted=True)
        admin = Identity("admin token", f"Bearer {ADMIN_TOKEN}", trusted=True)
        wrong = Identity("wrong key", "Bearer tb-" + "0" * 40, trusted=False)
        # a header value outside ASCII (Latin-1 on the wire) must be refused like any other wrong key
        garbled = Identity("non-ASCII key", "Bearer tb-cl\u00e9-\u00ff", trusted=False)
        nobody = Identity("no key", None, trusted=False)
        if path.startswith("/v1/admin/"):
            return [admin, tenant, wrong, garbled, nobody]
        if path.startswith("/v1/costs"):
            return [tenant, admin, wrong, garbled, nobody]
        return [tenant, wrong, garbled, nobody]

    def record(self, label: str, identity: Identity, status: int) -> None:
        self.seen.setdefault((label, identity.name), Counter())[status] += 1


def _create_real_objects(stack: Stack, key: str) -> dict[str, str]:
    """One of each object the tenant can own (and a tenant for the admin routes), created through the API."""
    ids: dict[str, str] = {"model_id": "gpt-4o-mini"}
    with stack.admin_client() as admin:
        created = admin.post("/v1/admin/tenants", json={"name": "fuzz-admin-target"})
        assert created.status_code == 201, created.text
        ids["tenant_id"] = created.json()["id"]
    with stack.client(key) as client:
        task = client.post("/v1/tasks", json={"prompt": "Say hi", "urgent": True})
        assert task.status_code == 202, task.text
        ids["task_id"] = task.json()["id"]
        job = client.post("/v1/jobs", json={"name": "fuzz-job", "labels": ["a", "b"], "tier": "light",
                                            "items": [{"id": "one", "text": "x"}]})
        assert job.status_code == 202, job.text
        ids["job_id"] = job.json()["id"]
        line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
        upload = client.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("fuzz.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n"))})
        assert upload.status_code == 200, upload.text
        ids["file_id"] = upload.json()["id"]
        batch = client.post("/v1/batches", json={"input_file_id": ids["file_id"], "endpoint": "/v1/chat/completions",
                                                 "completion_window": "24h"})
        assert batch.status_code == 200, batch.text
        ids["batch_id"] = batch.json()["id"]
    return ids


def _delete_schedules(stack: Stack, key: str) -> None:
    """Schedules the fuzz created must not go on running for the rest of the session."""
    with stack.client(key) as client:
        while True:
            page = client.get("/v1/schedules", params={"limit": 100}).json()
            for schedule in page.get("data", []):
                client.delete(f"/v1/schedules/{schedule['id']}")
            if not page.get("data"):
                return


@pytest.fixture(scope="module")
def fuzz_world(stack: Stack) -> Iterator[FuzzWorld]:
    key = stack.new_tenant_key("fuzz")
    world = FuzzWorld(tenant_key=key, real_ids=_create_real_objects(stack, key),
                      trusted=_session(TRUSTED_ADDRESS), untrusted=_session(UNTRUSTED_ADDRESS))
    try:
        yield world
    finally:
        world.trusted.close()
        world.untrusted.close()
        _delete_schedules(stack, key)


def _ndjson(ctx: Any, value: Any) -> bytes:
    """Items as NDJSON lines; anything else the generator made is sent as one JSON line."""
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@pytest.fixture(scope="module")
def app_document(stack: Stack) -> dict[str, Any]:
    answer = httpx.get(f"{stack.api_url}/openapi.json", timeout=30)
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


@pytest.fixture(scope="module")
def api_schema(stack: Stack, app_document: dict[str, Any], fuzz_world: FuzzWorld) -> Any:
    schemathesis.serializer(NDJSON)(_ndjson)
    # NUL and every other code point in generated strings, header values kept to what HTTP can carry
    config = schemathesis.Config.from_dict({"base-url": stack.api_url, "request-timeout": REQUEST_TIMEOUT,
                                            "generation": {"allow-x00": True}})
    return schemathesis.openapi.from_dict(completed(app_document, [fuzz_world.real_ids["file_id"]]), config=config)


def test_every_operation_with_a_body_has_one_to_fuzz(app_document: dict[str, Any]) -> None:
    """A new route that reads its own body must be described here, or the fuzz would send it nothing."""
    assert body_gaps(app_document) == []


@dataclass(frozen=True)
class Finding:
    label: str
    identity: str
    outcome: str  # the status and the start of the body, or "no answer (...)"
    curl: str


def _call(world: FuzzWorld, case: Any, identity: Identity, label: str) -> Finding | None:
    headers = identity.headers()
    session = world.trusted if identity.trusted else world.untrusted
    try:
        response = case.call(session=session, headers=headers, timeout=REQUEST_TIMEOUT)
    except requests.RequestException as exc:
        session.close()
        return Finding(label, identity.name, f"no answer ({type(exc).__name__}: {exc})",
                       case.as_curl_command(headers=headers))
    world.record(label, identity, response.status_code)
    if response.status_code >= 500:
        # the server may close a connection after an error it did not expect: the next request goes on a new
        # one, so a failure is blamed on the request that caused it
        session.close()
    try:
        case.validate_response(response, checks=[not_a_server_error], headers=headers)
    except schemathesis.errors.FailureGroup:
        return Finding(label, identity.name, f"{response.status_code} {response.text[:300]!r}",
                       case.as_curl_command(headers=headers))
    return None


def _fuzz_operation(world: FuzzWorld, operation: Any) -> list[Finding]:
    """EXAMPLES_PER_OPERATION generated requests (valid and invalid by the document), each sent with every
    identity, then once more with existing objects in the path; every 5xx or dropped connection is kept."""
    findings: list[Finding | None] = []
    label = f"{operation.method.upper()} {operation.path}"
    identities = world.identities(operation.path)
    strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    # the same requests on every run (a fixed seed, no example database), and no shrinking: a failure is kept
    # as found and the generation goes on, so every one of them is listed
    @hypothesis.seed(SEED)
    @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, database=None, deadline=None,
                         phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck),
                         verbosity=hypothesis.Verbosity.quiet, print_blob=False)
    @hypothesis.given(case=strategy)
    def explore(case: Any) -> None:
        for identity in identities:
            findings.append(_call(world, case, identity, label))
        # again with objects that exist in place of the generated ids, with the credential that owns them
        path_parameters = dict(case.path_parameters or {})
        real = {name: world.real_ids[name] for name in path_parameters if name in world.real_ids}
        if real:
            case.path_parameters = {**path_parameters, **real}
            findings.append(_call(world, case, identities[0], label + " (existing objects)"))
            case.path_parameters = path_parameters

    explore()
    return [finding for finding in findings if finding is not None]


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): .*$", re.MULTILINE)


def _report(findings: list[Finding], api_log: str) -> str:
    """One line per operation, identity and outcome (with how often and one curl to reproduce it), then the
    distinct exceptions of the API's log."""
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.label, finding.identity, finding.outcome.split(" ", 1)[0]), []).append(finding)
    lines = [f"{len(findings)} requests got a 5xx or no answer:"]
    for (label, identity, status), found in groups.items():
        lines.append(f"- {label} with {identity}: {status} x{len(found)}; e.g. {found[0].outcome[:200]}")
        lines.append(f"    {found[0].curl[:1500]}")
    exceptions = Counter(match[:300] for match in _EXCEPTION_LINE.findall(api_log))
    lines.append("exceptions in the API log:")
    lines += [f"  {count} x {line}" for line, count in exceptions.most_common(15)]
    return "\n".join(lines)


def test_no_request_gets_a_server_error_or_a_dropped_connection(api_schema: Any, fuzz_world: FuzzWorld,
                                                                sim_reset: Stack) -> None:
    started = time.monotonic()
    findings: list[Finding] = []
    unreached: list[str] = []
    # the app's document is valid: a broken operation is an error here; the operations that end an object
    # (deletes, cancels) go last, so the others still find the existing objects
    operations = sorted((result.ok() for result in api_schema.get_all_operations()),
                        key=lambda op: op.method == "delete" or op.path.endswith("/cancel"))
    for operation in operations:
        if time.monotonic() - started > TIME_BUDGET_SECONDS:
            unreached.append(f"{operation.method.upper()} {operation.path}")
            continue
        findings += _fuzz_operation(fuzz_world, operation)
    api_log = sim_reset.processes["api"].log_path
    assert not findings, _report(findings, api_log.read_text(errors="replace") if api_log else "")
    assert not unreached, f"over the {TIME_BUDGET_SECONDS} s budget; not fuzzed: {unreached}"


def test_the_fuzz_reached_the_app_and_no_route_served_a_stranger(fuzz_world: FuzzWorld,
                                                                 app_document: dict[str, Any]) -> None:
    """The run above counts only if its requests got past authentication and validation; and a wrong key or
    none never got a 2xx outside the public routes."""
    assert fuzz_world.seen, "the fuzz test did not run"
    labels = {f"{method.upper()} {path}" for path, ops in app_document["paths"].items() for method in ops}
    fuzzed = {label for label, _ in fuzz_world.seen}
    assert labels <= fuzzed, f"operations never fuzzed: {sorted(labels - fuzzed)}"
    accepted = {label for (label, who), statuses in fuzz_world.seen.items()
                if who in ("tenant key", "admin token") and any(200 <= s < 300 for s in statuses)}
    for label in ("POST /v1/tasks", "POST /v1/chat/completions", "GET /v1/jobs", "GET /v1/costs",
                  "GET /v1/files/{file_id}/content (existing objects)",
                  "GET /v1/jobs/{job_id}/results (existing objects)", "POST /v1/admin/tenants"):
        assert label in accepted, f"{label}: no generated request was accepted ({sorted(accepted)})"
    for (label, who), statuses in fuzz_world.seen.items():
        path = label.split(" ", 1)[1]
        if who in ("wrong key", "non-ASCII key", "no key") and not path.startswith(PUBLIC):
            served = {status for status in statuses if 200 <= status < 300}
            assert not served, f"{label} answered {served} to a caller with {who}"
