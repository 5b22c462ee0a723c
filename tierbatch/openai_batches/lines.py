"""One line of a batch input file, checked as OpenAI checks it, plus our routing of its model.

Used when a file is uploaded (every line checked) and again when a batch is created from it (every line
routed, with the tenant's routing rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import InvalidInput, Refused
from tierbatch.base.inputs import NotJson, loads_checked
from tierbatch.gateway.routing import Route, route_request
from tierbatch.gateway.validation import validate_chat_body
from tierbatch.routing.rules import RuleView

ENDPOINT = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class BatchLine:
    number: int  # 1-based line number in the file
    custom_id: str
    body: dict[str, Any]
    route: Route


def _line_error(number: int, error: Refused) -> InvalidInput:
    """A line's refusal, as the file's: always a 400 naming the line (a line asking for an unknown model
    too), its param under `body.` when it is one of the request's fields."""
    param = error.param
    in_body = param and not param.startswith(("custom_id", "method", "url", "body"))
    return InvalidInput(f"Line {number}: {error.message}", f"body.{param}" if in_body else param, error.code)


def parse_batch_line(number: int, raw: bytes, config: AppConfig, rules: Mapping[str, RuleView] | None = None
                     ) -> BatchLine:
    """One line of a batch input file, checked as OpenAI checks it plus our routing of its model:
    `smart-select` with tier auto follows the tenant's routing rule for the line's task type (`rules`,
    from `tenant_rules`) before config `[routing]` and the heuristic."""
    try:
        obj = loads_checked(raw)
    except NotJson:
        raise InvalidInput(f"Line {number}: this line is not parseable as valid JSON.",
                           "file", "invalid_json_line") from None
    except InvalidInput as refused:  # nesting too deep, NUL or lone surrogate: never stored
        raise InvalidInput(f"Line {number}: {refused.message}", refused.param or "file", "invalid_value") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"Line {number}: this line is not a JSON object.", "file", "invalid_json_line")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidInput(f"Line {number}: Missing required parameter: 'custom_id'.",
                           "custom_id", "missing_required_parameter")
    if len(custom_id) > 512:
        raise InvalidInput(f"Line {number}: 'custom_id' is longer than 512 characters.",
                           "custom_id", "invalid_value")
    method = obj.get("method")
    if method != "POST":
        raise InvalidInput(f"Line {number}: the method must be 'POST', got {method!r}.",
                           "method", "invalid_method")
    url = obj.get("url")
    if url != ENDPOINT:
        raise InvalidInput(f"Line {number}: the URL {url!r} is not supported; every line must use "
                           f"'{ENDPOINT}'.", "url", "invalid_url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise InvalidInput(f"Line {number}: Missing required parameter: 'body'.", "body", "missing_required_parameter")
    try:
        validate_chat_body(body, allow_stream=False)
        metadata = body.get("metadata") or {}
        route = route_request(config, body["model"], body["messages"], tier_hint=metadata.get("tier"),
                              task_type_hint=metadata.get("task_type"),
                              tools_requested=bool(body.get("tools") or body.get("functions")), rules=rules)
    except Refused as error:
        raise _line_error(number, error) from None
    return BatchLine(number, custom_id, body, route)
