"""Bulk job requests without services: validation, task request bodies, ids, tiers, labels, CLI readers."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tierbatch.api.errors import status_of
from tierbatch.base.config import AppConfig
from tierbatch.base.errors import InvalidInput
from tierbatch.base.ids import new_task_ids
from tierbatch.base.messaging import DISPATCH_TASKS
from tierbatch.base.states import RequestedTier
from tierbatch.cli.jobs import CliError, ItemSource, RequestBody, SourceItem, read_csv, read_jsonl
from tierbatch.jobs.read import label_of
from tierbatch.jobs.requests import JobItem, JobSettings, parse_job_request
from tierbatch.jobs.rows import RequestEncoder, label_response_format, task_rows, tier_chooser
from tierbatch.jobs.store import dispatch_in_chunks

LIMIT = 1 << 20
CONFIG = AppConfig.model_validate({
    "providers": {"sim": {"base_url": "http://127.0.0.1:1/v1"}},
    "tiers": {"light": {"provider": "sim", "model": "small"}, "complex": {"provider": "sim", "model": "big"}},
    "routing": {"classification": "light"},
})


def one(n: int = 1) -> list[dict[str, Any]]:
    return [{"id": f"i{k}", "text": f"text {k}"} for k in range(n)]


def test_defaults_and_what_was_given() -> None:
    request = parse_job_request({"items": one(2)}, LIMIT)
    assert request.name is None and request.given == frozenset()
    assert request.settings == JobSettings()
    assert [i.id for i in request.items] == ["i0", "i1"]
    labelled = parse_job_request({"name": "n", "labels": ["a", "b"], "tier": "light", "items": one()}, LIMIT)
    assert labelled.name == "n" and labelled.given == {"labels", "tier"}
    assert labelled.settings.task_type == "classification"  # labels make it a classification job by default
    assert labelled.settings.labels == ("a", "b") and labelled.settings.tier is RequestedTier.LIGHT
    explicit = parse_job_request({"labels": ["a"], "task_type": "routing", "items": one()}, LIMIT)
    assert explicit.settings.task_type == "routing"


def test_ids_may_be_integers_and_items_may_be_messages() -> None:
    request = parse_job_request({"items": [{"id": 7, "text": "x"},
                                           {"id": "m", "messages": [{"role": "user", "content": "hi"}]}]}, LIMIT)
    assert request.items == [JobItem("7", "x", None), JobItem("m", None, [{"role": "user", "content": "hi"}])]


BAD: list[tuple[str, Any, str | None, int, str]] = [
    ("duplicate ids", {"items": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "items[1].id", 422,
     "duplicate item id 'a' (also items[0])"),
    ("int and str ids collide", {"items": [{"id": 1, "text": "x"}, {"id": "1", "text": "y"}]}, "items[1].id", 422,
     "duplicate"),
    ("empty items", {"items": []}, "items", 422, "at least one"),
    ("items not a list", {"items": {"id": "a"}}, "items", 422, "must be a list"),
    ("no items", {}, "items", 422, "required"),
    ("template without slot", {"template": "Ticket", "items": one()}, "template", 422, "{text}"),
    ("labels null-ish string", {"labels": "a", "items": one()}, "labels", 422, "non-empty list of distinct"),
    ("labels empty", {"labels": [], "items": one()}, "labels", 422, "non-empty list"),
    ("labels repeated", {"labels": ["a", "a"], "items": one()}, "labels[1]", 422, "duplicate label 'a'"),
    ("label blank", {"labels": ["a", " "], "items": one()}, "labels[1]", 422, "non-empty string"),
    ("label object", {"labels": [{"x": 1}], "items": one()}, "labels[0]", 422, "non-empty string"),
    ("item without text", {"items": [{"id": "a"}]}, "items[0]", 422, "'text' or 'messages'"),
    ("item with both", {"items": [{"id": "a", "text": "x", "messages": []}]}, "items[0]", 422, "not both"),
    ("item not object", {"items": ["hello"]}, "items[0]", 422, "must be an object"),
    ("item text not str", {"items": [{"id": "a", "text": 5}]}, "items[0].text", 422, "string"),
    ("item text blank", {"items": [{"id": "a", "text": ""}]}, "items[0].text", 422, "empty"),
    ("item id bool", {"items": [{"id": True, "text": "x"}]}, "items[0].id", 422, "string or an integer"),
    ("item id blank", {"items": [{"id": " ", "text": "x"}]}, "items[0].id", 422, "empty"),
    ("item id missing", {"items": [{"text": "x", "meta": 1}]}, "items[0].meta", 422, "unknown field"),
    ("item NUL", {"items": [{"id": "a", "text": "x\x00y"}]}, "items[0].text", 422, "NUL"),
    ("item lone surrogate", {"items": [{"id": "a", "text": "x\ud800"}]}, "items[0].text", 422, "surrogate"),
    ("messages empty", {"items": [{"id": "a", "messages": []}]}, "items[0].messages", 422, "non-empty list"),
    ("messages bad role", {"items": [{"id": "a", "messages": [{"role": "bot", "content": "x"}]}]},
     "items[0].messages[0].role", 422, "one of"),
    ("messages bad content", {"items": [{"id": "a", "messages": [{"role": "user", "content": 3}]}]},
     "items[0].messages[0].content", 422, "string or a list"),
    ("bad tier", {"tier": "premium", "items": one()}, "tier", 422, "tier"),
    ("bad urgent", {"urgent": "maybe", "items": one()}, "urgent", 422, "urgent"),
    ("unknown top-level key", {"colour": "red", "items": one()}, "colour", 422, "unknown field"),
    ("unknown params key", {"params": {"n": 2}, "items": one()}, "params.n", 422, "unknown field"),
    ("labels with response_format", {"labels": ["a"], "params": {"response_format": {"type": "text"}},
                                     "items": one()}, "params.response_format", 422, "labels"),
    ("naive deadline", {"deadline": "2030-01-01T00:00:00", "items": one()}, "deadline", 422, "timezone"),
    ("non-string metadata", {"metadata": {"team": 1}, "items": one()}, "metadata.team", 422, "string"),
    ("empty name", {"name": "", "items": one()}, "name", 422, "name"),
    ("text too big", {"items": [{"id": "a", "text": "x" * (LIMIT + 1)}]}, "items[0].text", 413, "over the limit"),
    ("body not an object", [], None, 400, "JSON object"),
]


@pytest.mark.parametrize(("label", "payload", "param", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_name_the_problem(label: str, payload: Any, param: str | None, status: int,
                                       words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_job_request(payload, LIMIT)
    assert caught.value.param == param
    assert status_of(caught.value) == status
    assert words in caught.value.message
    if param is not None:
        assert caught.value.message.startswith(f"{param}:")


def test_too_many_items_is_413_before_looking_at_them() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_job_request({"items": [None] * 11}, LIMIT, max_items=10)
    assert status_of(caught.value) == 413 and caught.value.param == "items"
    assert "at most 10 items" in caught.value.message


def test_labelled_request_body() -> None:
    settings = parse_job_request({"labels": ["billing", "bug"], "system": "Route it.", "template": "T: {text}",
                                  "params": {"temperature": 0}, "items": one()}, LIMIT).settings
    body = json.loads(RequestEncoder(settings).encode(JobItem("a", 'say "hi"\n\tü \\ {text}', None)))
    assert body == {
        "messages": [{"role": "system", "content": "Route it."},
                     {"role": "user", "content": 'T: say "hi"\n\tü \\ {text}'}],
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": {
            "type": "object", "properties": {"label": {"type": "string", "enum": ["billing", "bug"]}},
            "required": ["label"], "additionalProperties": False}}},
    }
    assert body["response_format"] == label_response_format(["billing", "bug"])


def test_template_with_two_slots_and_messages_items() -> None:
    settings = JobSettings(template="{text} / {text}", system="S")
    encode = RequestEncoder(settings).encode
    assert json.loads(encode(JobItem("a", "x", None)))["messages"][1]["content"] == "x / x"
    own_system = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert json.loads(encode(JobItem("b", None, own_system)))["messages"] == own_system
    plain = [{"role": "user", "content": "q"}]
    assert json.loads(encode(JobItem("c", None, plain)))["messages"] == [{"role": "system", "content": "S"}, *plain]


def test_tier_resolved_once_when_fixed_and_per_item_on_auto() -> None:
    item_code = JobItem("a", "def f(x):\n    return x", None)
    item_plain = JobItem("b", "hello", None)
    fixed = tier_chooser(JobSettings(tier=RequestedTier.COMPLEX), CONFIG)
    assert fixed(item_plain) is fixed(item_code) and fixed(item_plain).tier == "complex"
    configured = tier_chooser(JobSettings(task_type="classification"), CONFIG)
    assert configured(item_code).tier == "light" and "config routing" in configured(item_code).reason
    auto = tier_chooser(JobSettings(), CONFIG)
    assert auto(item_code).tier == "complex" and auto(item_plain).tier == "light"


def test_task_rows_follow_the_copy_columns() -> None:
    from tierbatch.db.bulk_sql import TASK_COPY_COLUMNS

    settings = JobSettings(task_type="classification", labels=("a",), metadata={"team": "x"}, urgent=True)
    ids = new_task_ids(2)
    tenant, job = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    rows = list(task_rows([JobItem("1", "p", None), JobItem("2", "q", None)], ids, settings, CONFIG, tenant, job,
                          now))
    first = dict(zip(TASK_COPY_COLUMNS, rows[0], strict=True))
    assert first["id"] == ids[0] and first["item_id"] == "1" and first["tier"] == "light"
    assert first["tenant_id"] == str(tenant) and first["job_id"] == str(job) and first["status"] == "queued"
    assert json.loads(first["metadata"]) == {"team": "x"} and first["urgent"] is True
    assert json.loads(first["request"])["messages"] == [{"role": "user", "content": "p"}]


def stored_as(settings: JobSettings, items: list[JobItem], config: AppConfig = CONFIG) -> list[tuple[Any, ...]]:
    """(item id, status, mode, provider, model) of each COPY row."""
    from tierbatch.db.bulk_sql import TASK_COPY_COLUMNS

    rows = task_rows(items, new_task_ids(len(items)), settings, config, uuid.uuid4(), uuid.uuid4(),
                     datetime.now(UTC))
    wanted = ("item_id", "status", "mode", "provider", "model")
    return [tuple(dict(zip(TASK_COPY_COLUMNS, row, strict=True))[name] for name in wanted) for row in rows]


def test_light_items_of_a_batch_path_job_are_stored_waiting_for_a_batch() -> None:
    code, plain = JobItem("code", "def f(x):\n    return x", None), JobItem("plain", "hello", None)
    assert stored_as(JobSettings(), [code, plain]) == [
        ("code", "queued", None, None, None),  # complex: an immediate call, routed after the commit
        ("plain", "waiting_batch", "batch", "sim", "small")]
    assert stored_as(JobSettings(task_type="classification", labels=("a",)), [code]) == [
        ("code", "waiting_batch", "batch", "sim", "small")]


@pytest.mark.parametrize(("why", "settings"), [
    ("urgent", JobSettings(urgent=True)),
    ("a deadline the batch path cannot meet", JobSettings(deadline=datetime.now(UTC))),
    ("temperature 0: the response cache may answer it", JobSettings(params={"temperature": 0})),
    ("the cache switched on", JobSettings(metadata={"cache": "on"})),
])
def test_light_items_routing_must_look_at_stay_queued(why: str, settings: JobSettings) -> None:
    assert stored_as(settings, [JobItem("plain", "hello", None)]) == [("plain", "queued", None, None, None)], why


def test_a_light_provider_without_a_batch_api_keeps_items_queued_for_its_lane() -> None:
    lane = CONFIG.model_copy(update={"providers": {"sim": CONFIG.providers["sim"].model_copy(
        update={"batch": False})}})
    assert stored_as(JobSettings(), [JobItem("plain", "hello", None)])[0][1] == "waiting_batch"
    assert stored_as(JobSettings(), [JobItem("plain", "hello", None)], lane) == [
        ("plain", "queued", None, None, None)]


def test_labels_are_read_from_json_answers_only_when_allowed() -> None:
    labels = frozenset({"billing", "bug"})
    assert label_of('{"label": "bug"}', labels) == "bug"
    assert label_of('{"label": "other"}', labels) is None
    assert label_of("bug", labels) is None
    assert label_of('["bug"]', labels) is None
    assert label_of(None, labels) is None


def test_dispatch_is_one_message_per_thousand_tasks() -> None:
    sent: list[tuple[str, list[str]]] = []
    ids = [str(i) for i in range(2500)]
    assert dispatch_in_chunks(lambda name, chunk: sent.append((name, chunk)), ids) == 3
    assert [len(chunk) for _, chunk in sent] == [1000, 1000, 500]
    assert {name for name, _ in sent} == {DISPATCH_TASKS}
    assert [i for _, chunk in sent for i in chunk] == ids


def test_parsing_100k_items_builds_every_row() -> None:
    """Its speed is measured by bench/ingest.py, not asserted here."""
    payload = {"labels": ["a", "b"], "items": [{"id": f"t{i}", "text": f"ticket {i} text"} for i in range(100_000)]}
    request = parse_job_request(payload, LIMIT)
    rows = sum(1 for _ in task_rows(request.items, new_task_ids(100_000), request.settings, CONFIG,
                                    uuid.uuid4(), uuid.uuid4(), datetime.now(UTC)))
    assert rows == 100_000


# --- CLI file readers ------------------------------------------------------------------------------

def test_csv_reader_maps_columns_and_counts_lines() -> None:
    source = io.StringIO('key,body,x\n1,"two\nlines",z\n2,plain,z\n')
    found = list(read_csv(source, "key", "body", "f.csv"))
    assert found == [SourceItem(2, {"id": "1", "text": "two\nlines"}), SourceItem(4, {"id": "2", "text": "plain"})]


@pytest.mark.parametrize(("content", "message"), [
    ("", "the file is empty"),
    ("key,text\n1,a\n", "no column 'id' (columns: key, text)"),
    ("id,text\n1,\n", "f.csv:2: empty 'text'"),
])
def test_csv_reader_errors(content: str, message: str) -> None:
    with pytest.raises(CliError) as caught:
        list(read_csv(io.StringIO(content), "id", "text", "f.csv"))
    assert message in str(caught.value)


@pytest.mark.parametrize(("content", "message"), [
    ('{"id": 1, "text": "a"}\nnot json\n', "f.jsonl:2: not valid JSON"),
    ('[1]\n', "f.jsonl:1: each line must be a JSON object"),
    ('{"text": "a"}\n', "f.jsonl:1: no 'id' field"),
    ('{"id": "a", "body": "x"}\n', "f.jsonl:1: no 'text' (or 'messages') field"),
    ('{"id": "a", "text": ""}\n', "f.jsonl:1: field 'text' must be a non-empty string"),
])
def test_jsonl_reader_errors(content: str, message: str) -> None:
    with pytest.raises(CliError) as caught:
        list(read_jsonl(io.StringIO(content), "id", "text", "f.jsonl"))
    assert message in str(caught.value)


JSONL = ('{"id": 1, "text": "a"}\n\n{"id": "b", "messages": [{"role": "user", "content": "c"}]}\n'
         '{"id": 3, "text": "d"}\n')


def test_jsonl_reader_keeps_file_lines() -> None:
    found = list(read_jsonl(io.StringIO(JSONL), "id", "text", "f.jsonl"))
    assert [item.line for item in found] == [1, 3, 4]
    assert found[1].body == {"id": "b", "messages": [{"role": "user", "content": "c"}]}


def test_a_request_body_is_the_job_line_then_at_most_limit_items(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(JSONL)
    source = ItemSource(path, "jsonl", "id", "text")
    seen: list[tuple[int, bool]] = []
    body = RequestBody({"name": "n"}, source.items_from(1), 2, lambda b: seen.append((b.sent, b.done)))
    lines = [json.loads(line) for line in b"".join(body).decode().splitlines()]
    assert lines == [{"name": "n"}, {"id": "b", "messages": [{"role": "user", "content": "c"}]},
                     {"id": 3, "text": "d"}]
    assert body.sent == 2 and body.done and seen[-1] == (2, True)
    assert source.line_of(2) == 4 and source.line_of(3) is None
