"""Classification labels: asked for with a JSON-schema enum, answers validated against it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def label_response_format(labels: Sequence[str]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {
        "name": "label", "strict": True,
        "schema": {"type": "object", "properties": {"label": {"type": "string", "enum": list(labels)}},
                   "required": ["label"], "additionalProperties": False},
    }}


def labels_of(request: Mapping[str, Any]) -> list[str] | None:
    """The enum of a request's `label` JSON-schema response format, if it asks for one."""
    response_format = request.get("response_format")
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    enum = ((schema.get("properties") or {}).get("label") or {}).get("enum")
    return [str(v) for v in enum] if isinstance(enum, list) else None


def extract_label(output: str | None, labels: Sequence[str]) -> str | None:
    """The answer's label if it is one of `labels`, else None."""
    if not output:
        return None
    try:
        parsed = json.loads(output)
    except json.JSONDecodeError:
        candidate: Any = output.strip()
    else:
        candidate = parsed.get("label") if isinstance(parsed, dict) else parsed
    return candidate if isinstance(candidate, str) and candidate in labels else None


def label_error(request: Mapping[str, Any], output: str | None) -> str | None:
    """Why an answer is unacceptable for a labelled request, or None if it is fine."""
    labels = labels_of(request)
    if labels is None or extract_label(output, labels) is not None:
        return None
    shown = (output or "")[:200]
    return f"answer {shown!r} is not one of the labels {labels}"
