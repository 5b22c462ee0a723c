"""The API description the fuzz suite generates requests from: the app's own `/openapi.json`, plus what it
cannot say by itself.

Most routes read and check their body themselves (size limits before parsing, streamed NDJSON, multipart,
the OpenAI surface's error shapes), so FastAPI documents no body for them, and the cost routes read their
query string as a whole. For those operations this module adds a request body (or query parameters) written
from the documented contract: loose on purpose (extra fields allowed, few required), so that generated
requests reach the deep checks as well as the shallow ones. Every other part of the document (paths, path and
query parameters, the bodies FastAPI does document) is the app's own.
"""

from __future__ import annotations

import copy
from typing import Any

STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 3}
NAME: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 40}
MODELS = ["smart-select", "gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1"]


def closed(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    """An object with these fields only: valid examples stay valid, and the invalid ones (negative mode) get
    unknown fields among their mutations."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


MESSAGE = closed({
    "role": {"enum": ["system", "developer", "user", "assistant"]},
    "content": {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": 2,
         "items": closed({"type": {"const": "text"}, "text": {"type": "string"}}, "type", "text")},
    ]},
    "name": NAME,
}, "role", "content")
MESSAGES: dict[str, Any] = {"type": "array", "minItems": 1, "maxItems": 3, "items": MESSAGE}
RESPONSE_FORMAT: dict[str, Any] = {"anyOf": [
    closed({"type": {"enum": ["text", "json_object"]}}, "type"),
    closed({"type": {"const": "json_schema"},
            "json_schema": closed({"name": {"type": "string", "pattern": "^[a-z_]{1,20}$"},
                                   "strict": {"type": "boolean"},
                                   "schema": closed({"type": {"const": "object"},
                                                     "properties": {"type": "object", "maxProperties": 2}},
                                                    "type")}, "name")},
           "type", "json_schema"),
]}
CHAT_PARAMS: dict[str, Any] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**31},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
    "stop": {"anyOf": [NAME, {"type": "array", "minItems": 1, "maxItems": 2, "items": NAME}]},
    "response_format": RESPONSE_FORMAT,
}
TIER = {"enum": ["light", "complex", "auto"]}
DEADLINE = {"type": "string", "format": "date-time"}
_TASK_FIELDS: dict[str, Any] = {
    "messages": MESSAGES, "prompt": {"type": "string", "minLength": 1}, "task_type": NAME, "tier": TIER,
    "urgent": {"type": "boolean"}, "deadline": DEADLINE, "params": closed(CHAT_PARAMS), "metadata": STRING_MAP,
    "idempotency_key": NAME,
}
TASK: dict[str, Any] = {"anyOf": [closed({k: v for k, v in _TASK_FIELDS.items() if k != "messages"}, "prompt"),
                                  closed({k: v for k, v in _TASK_FIELDS.items() if k != "prompt"}, "messages")]}
ITEM: dict[str, Any] = {"anyOf": [closed({"id": NAME, "text": {"type": "string", "minLength": 1}}, "id", "text"),
                                  closed({"id": NAME, "messages": MESSAGES}, "id", "messages")]}
LABELS = {"type": "array", "minItems": 1, "maxItems": 3, "uniqueItems": True, "items": NAME}
JOB_FIELDS: dict[str, Any] = {
    "task_type": NAME, "tier": TIER, "urgent": {"type": "boolean"}, "deadline": DEADLINE,
    "params": closed({k: v for k, v in CHAT_PARAMS.items() if k != "response_format"}),
    "system": {"type": "string"}, "template": {"type": "string", "pattern": "^[a-zA-Z :]{0,20}\\{text\\}$"},
    "labels": LABELS, "metadata": STRING_MAP,
}
JOB = closed({"name": NAME, **JOB_FIELDS, "webhook_url": {"type": "string", "format": "uri"},
              "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": ITEM}}, "items")
SOURCE: dict[str, Any] = {"anyOf": [
    closed({"type": {"const": "file"}, "path": NAME, "file_id": NAME, "format": {"enum": ["csv", "jsonl"]},
            "id_field": NAME, "text_field": NAME}, "type"),
    closed({"type": {"const": "sql"}, "source": NAME, "query": {"type": "string"}, "id_field": NAME,
            "text_field": NAME, "cursor_field": NAME}, "type"),
]}
CRON = {"anyOf": [{"enum": ["0 2 * * *", "*/5 * * * *", "0 0 1 1 *"]}, {"type": "string"}]}
SCHEDULE_FIELDS: dict[str, Any] = {
    "name": NAME, "cron": CRON, "timezone": {"anyOf": [{"enum": ["UTC", "Europe/Paris"]}, {"type": "string"}]},
    "enabled": {"const": False},  # a generated schedule never starts running on its own
    "job": closed(JOB_FIELDS), "source": SOURCE,
    "sink": closed({"type": {"const": "file"}, "path": NAME, "format": {"enum": ["jsonl", "csv"]}}, "type"),
    "webhook_url": {"type": "string", "format": "uri"}, "cursor": {"type": "string"},
}
CHAT = closed({
    "model": {"enum": MODELS}, "messages": MESSAGES, "stream": {"type": "boolean"},
    "stream_options": closed({"include_usage": {"type": "boolean"}}), "n": {"type": "integer", "minimum": 1,
                                                                            "maximum": 2},
    "metadata": STRING_MAP, "user": NAME, "service_tier": {"enum": ["auto", "default"]}, "store": {"const": False},
    **CHAT_PARAMS,
}, "model", "messages")
FILE_UPLOAD = closed({"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch", "user_data"]}},
                     "file", "purpose")


def batch_body(file_ids: list[str]) -> dict[str, Any]:
    return closed({"input_file_id": {"enum": file_ids} if file_ids else NAME,
                   "endpoint": {"const": "/v1/chat/completions"}, "completion_window": {"const": "24h"},
                   "metadata": STRING_MAP}, "input_file_id", "endpoint", "completion_window")


NDJSON = "application/x-ndjson"


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/chat/completions"): _json(CHAT),
    ("post", "/v1/files"): {"required": True, "content": {"multipart/form-data": {"schema": FILE_UPLOAD}}},
    ("post", "/v1/batches"): _json(batch_body([])),
    ("post", "/v1/tasks"): _json({"anyOf": [
        TASK, closed({"tasks": {"type": "array", "minItems": 1, "maxItems": 3, "items": TASK}}, "tasks")]}),
    ("post", "/v1/jobs"): _json(JOB),
    ("post", "/v1/jobs/{job_id}/items"): {"required": True, "content": {
        NDJSON: {"schema": {"type": "array", "minItems": 1, "maxItems": 3, "items": ITEM}}}},
    ("post", "/v1/schedules"): _json(closed(SCHEDULE_FIELDS, "name", "cron", "job", "source")),
    ("patch", "/v1/schedules/{schedule_id}"): _json(closed(SCHEDULE_FIELDS)),
}
# the chat call also reads the routing hints from headers
HEADERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("post", "/v1/chat/completions"): [
        {"name": "X-Tier", "in": "header", "required": False, "schema": TIER},
        {"name": "X-Task-Type", "in": "header", "required": False, "schema": {"type": "string"}},
    ],
}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_TIME = {"anyOf": [{"type": "string", "format": "date-time"}, {"enum": ["7d", "24h", "30d"]}, {"type": "string"}]}
_UUID = {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "string"}]}
_COST_FILTERS = [_query("since", _TIME), _query("until", _TIME), _query("task_type", {"type": "string"}),
                 _query("tenant_id", _UUID)]
QUERIES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("get", "/v1/costs"): [
        _query("group_by", {"anyOf": [{"enum": ["day", "model", "task_type", "tenant", "job", "mode",
                                                "day,model", "tier"]}, {"type": "string"}]}),
        _query("limit", {"type": "integer"}), _query("job_id", _UUID), _query("mode", {"type": "string"}),
        *_COST_FILTERS],
    ("get", "/v1/costs/report"): [*_COST_FILTERS, _query("growth_threshold_pct", {"type": "integer"}),
                                  _query("min_requests", {"type": "integer"})],
    ("get", "/v1/costs/budget"): [_query("tenant_id", _UUID)],
}
# operations that take no body at all (a body sent to them is ignored)
BODYLESS = frozenset({
    ("post", "/v1/batches/{batch_id}/cancel"),
    ("post", "/v1/tasks/{task_id}/cancel"), ("post", "/v1/jobs/{job_id}/cancel"),
    ("post", "/v1/schedules/{schedule_id}/run"), ("post", "/v1/admin/tenants/{tenant_id}/webhook-secret"),
    ("post", "/v1/admin/tenants/{tenant_id}/keys"),
})


def body_gaps(document: dict[str, Any]) -> list[str]:
    """Operations with a method that carries a body but neither a documented body nor one added here."""
    gaps = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method in ("post", "put", "patch") and "requestBody" not in operation \
                    and (method, path) not in BODIES and (method, path) not in BODYLESS:
                gaps.append(f"{method.upper()} {path}")
    return gaps


def completed(document: dict[str, Any], file_ids: list[str]) -> dict[str, Any]:
    """The app's document with the bodies, headers and query parameters above put in (a copy); a batch is
    created from one of `file_ids` (files that exist)."""
    out = copy.deepcopy(document)
    bodies = {**BODIES, ("post", "/v1/batches"): _json(batch_body(file_ids))}
    for path, operations in out["paths"].items():
        for method, operation in operations.items():
            key = (method, path)
            if key in bodies and "requestBody" not in operation:
                operation["requestBody"] = copy.deepcopy(bodies[key])
            known = {(p["name"], p["in"]) for p in operation.get("parameters", [])}
            extra = [p for p in (*HEADERS.get(key, []), *QUERIES.get(key, [])) if (p["name"], p["in"]) not in known]
            if extra:
                operation["parameters"] = [*operation.get("parameters", []), *copy.deepcopy(extra)]
    return out
