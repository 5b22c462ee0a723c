"""The request fields of a chat completion that the gateway accepts, and what it does with each.

The list is ours, written out here; it does not follow the installed `openai` SDK (a new SDK release
must not widen what tenants may send to a provider under the operator's account). The rule: a field
is forwarded only when whatever it costs shows up in the usage the ledger prices (input, cached input
and output tokens, reasoning tokens included, at the model's standard rates) and it keeps no tenant
data at the provider beyond the call. Checked on `POST /v1/chat/completions` and on every line of a
`POST /v1/batches` input file, before any provider call; a refusal is a 400 in OpenAI's shape naming
the field (`param`).

Forwarded to the provider as given, after OpenAI's own checks of their values (each line: the fields,
then what is allowed of them and why):

- `messages`: content parts of type `input_audio` are refused (audio tokens are billed at audio
  rates, which the ledger does not price); text, image and file parts are billed as input tokens
- `temperature`, `top_p`, `n`, `max_tokens`, `max_completion_tokens`, `stop`, `seed`,
  `presence_penalty`, `frequency_penalty`, `logit_bias`, `logprobs`, `top_logprobs`: sampling and
  output limits, billed as tokens (`n` choices are all counted in the output tokens)
- `response_format`, `tool_choice`, `parallel_tool_calls`, `functions`, `function_call`: structured
  output and tool use (`functions` and `function_call` are the deprecated forms of tools)
- `tools`: of types `function` and `custom` only (hosted tools are billed per call)
- `reasoning_effort`, `verbosity`: reasoning tokens are counted in the output tokens
- `prediction`: rejected prediction tokens are counted, and billed, as output tokens
- `user`, `safety_identifier`: the tenant's end-user identifiers, for the provider's abuse checks
- `prompt_cache_key`: a cache routing hint (the gateway sets its own when there is none)
- `service_tier`: `auto` or `default` only (`flex`, `scale`, `priority`, `fast` are billed at other
  rates)
- `modalities`: `["text"]` only (audio output is billed at audio rates)
- `store`: `false` only (`true` keeps the tenant's prompts and answers in the operator's provider
  account)
- `prompt_cache_retention`: `in_memory` only (`24h` keeps the tenant's prompt prefixes at the provider
  for a day)

Consumed by the gateway, not forwarded as given:

- `model`: `smart-select` or a configured model; each call along the chain names its own model
- `stream`, `stream_options`: the gateway streams itself and always asks the provider for usage
  (`include_usage`); the client gets the usage chunk only if it asked
- `metadata`: routing (`tier`, `task_type`), the response cache switch (`cache`) and the tenant's own
  keys, kept on the task; never sent (a provider keeps metadata only with `store`, which is refused)

Refused whenever set (null counts as unset):

- `web_search_options`: web search is billed per call and per search result, not priced
- `audio`: audio output, billed at audio rates, not priced
- `moderation`: moderated completions run, and bill, a moderation model the ledger does not price
- `prompt_cache_options`: cache breakpoints, whose billing the ledger does not model

Any other field is a 400 `unknown_parameter` ("Unrecognized request argument supplied"), as OpenAI
answers.

Recordable: every call is recorded as a task with its ledger row, in Postgres `text` and `jsonb`
columns, which cannot hold NUL characters, unpaired UTF-16 surrogates or the non-JSON numbers NaN and
Infinity (which Python's parser takes, `1e999` included). `check_storable` refuses a request holding any
of them, anywhere (values and keys), or nested deeper than `MAX_DEPTH`, with a 400 naming
the field; the API's body limit keeps every string far under Postgres' size limits. What a provider
answers is recorded as `storable` makes it (those characters replaced by U+FFFD in the stored copy
only), so an answer can always be recorded.

Pure and standard-library only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from tierbatch.base.inputs import MAX_JSON_DEPTH, unstorable
from tierbatch.providers.openai_validation import InvalidRequest, invalid_type

FORWARDED_FIELDS = frozenset({
    "messages",
    "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
    "reasoning_effort", "verbosity", "prediction",
    "user", "safety_identifier", "prompt_cache_key",
    "service_tier", "modalities", "store", "prompt_cache_retention",
})
CONSUMED_FIELDS = frozenset({"model", "stream", "stream_options", "metadata"})
ACCEPTED_FIELDS = FORWARDED_FIELDS | CONSUMED_FIELDS

# field -> why it is refused (the 400's message says it)
REFUSED_FIELDS: Mapping[str, str] = MappingProxyType({
    "web_search_options": "web search is billed per call, at rates this gateway does not meter",
    "audio": "audio output is billed at audio token rates, which this gateway does not meter",
    "moderation": "moderated completions are billed in ways this gateway does not meter",
    "prompt_cache_options": "prompt cache options are billed in ways this gateway does not meter",
})

# field -> the values forwarded; anything else is refused
SERVICE_TIERS = ("auto", "default")
MODALITIES = ("text",)
PROMPT_CACHE_RETENTIONS = ("in_memory",)
TOOL_TYPES = ("function", "custom")
REFUSED_CONTENT_PARTS = ("input_audio",)

MAX_DEPTH = MAX_JSON_DEPTH  # the input guard's limit: one figure for both

_WALKED = (str, dict, list, float)  # what can hold something Postgres refuses: float for NaN and Infinity


def _refused(param: str, message: str, code: str = "unsupported_value") -> InvalidRequest:
    return InvalidRequest(message, param, code)


def _check_choice(body: Mapping[str, Any], field: str, allowed: tuple[str, ...], why: str) -> None:
    value = body.get(field)
    if value is None or value in allowed:
        return
    if not isinstance(value, str):
        raise invalid_type(field, "a string", value)
    supported = " and ".join(f"'{a}'" for a in allowed)
    raise _refused(field, f"Unsupported value for '{field}': '{_shown(value)}'. This gateway accepts {supported} "
                          f"only: {why}.")


def check_fields(body: Mapping[str, Any]) -> None:
    """Every field accepted, and every restricted value allowed (see the module docstring), or an
    `InvalidRequest` naming the field."""
    for key, value in body.items():
        if key in REFUSED_FIELDS:
            if value is not None:
                raise _refused(key, f"Unsupported parameter: '{key}' is not accepted by this gateway: "
                                    f"{REFUSED_FIELDS[key]}.", "unsupported_parameter")
        elif key not in ACCEPTED_FIELDS:
            raise InvalidRequest(f"Unrecognized request argument supplied: {_shown(key)}", _shown(key),
                                 "unknown_parameter")
    _check_choice(body, "service_tier", SERVICE_TIERS, "other service tiers are billed at rates this gateway "
                                                       "does not meter")
    _check_choice(body, "prompt_cache_retention", PROMPT_CACHE_RETENTIONS,
                  "a longer retention keeps the prompt at the provider")
    store = body.get("store")
    if store is not None:
        if not isinstance(store, bool):
            raise invalid_type("store", "a boolean", store)
        if store:
            raise _refused("store", "Unsupported value for 'store': true. This gateway accepts false only: a "
                                    "stored completion keeps the tenant's data at the provider.")
    modalities = body.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
            raise invalid_type("modalities", "an array of strings", modalities)
        for index, modality in enumerate(modalities):
            if modality not in MODALITIES:
                raise _refused(f"modalities[{index}]", f"Unsupported value for 'modalities[{index}]': "
                                                       f"'{_shown(modality)}'. This gateway accepts 'text' only: "
                                                       "audio is billed at rates it does not meter.")
    tools = body.get("tools")
    if isinstance(tools, list):
        for index, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind not in TOOL_TYPES:
                raise _refused(f"tools[{index}].type", f"Unsupported value for 'tools[{index}].type': "
                                                       f"'{_shown(kind)}'. This gateway accepts 'function' and "
                                                       "'custom' tools only: hosted tools are billed per call.")
    messages = body.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for part_index, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in REFUSED_CONTENT_PARTS:
                    param = f"messages[{index}].content[{part_index}].type"
                    raise _refused(param, f"Unsupported value for '{param}': '{kind}'. This gateway does not "
                                          "accept audio input: it is billed at rates it does not meter.")


# --- recordable ---------------------------------------------------------------------------------------


def _shown(text: str) -> str:
    """`text` safe to quote in an answer: NUL and unpaired surrogates as JSON escapes."""
    if _clean(text):
        return text
    return json.dumps(text)[1:-1]


def _clean(text: str) -> bool:
    return not unstorable(text)


def _unstorable(param: str | None, text: str, what: str) -> InvalidRequest:
    kind = "a NUL character (\\u0000)" if "\x00" in text else "an unpaired UTF-16 surrogate"
    where = f"'{param}'" if param else "the request body"
    return InvalidRequest(f"Invalid {where}: {what} holds {kind}, which cannot be recorded.", param,
                          "invalid_value")


def check_storable(value: Any, param: str = "") -> None:
    """Every string in `value` (object keys too) storable in Postgres `text`/`jsonb`, and the nesting at
    most `MAX_DEPTH`; else an `InvalidRequest` naming the field (a bad key is named with JSON escapes).
    Iterative: a deep value cannot exhaust the stack."""
    if not _is_storable(value):
        _locate(value, param)


def _is_storable(value: Any) -> bool:
    """The check without the field names (the common case, twice as fast)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if not _clean(item):
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            if depth >= MAX_DEPTH:
                return False
            for key, sub in item.items():
                if isinstance(key, str) and not _clean(key):
                    return False
                if isinstance(sub, _WALKED):
                    pending.append((sub, depth + 1))
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                return False
            pending.extend((sub, depth + 1) for sub in item if isinstance(sub, _WALKED))
    return True


def _locate(value: Any, param: str) -> None:
    """Raise the `InvalidRequest` naming the first field `_is_storable` refused."""
    pending: list[tuple[Any, str, int]] = [(value, param, 0)]
    while pending:
        item, where, depth = pending.pop()
        if isinstance(item, str):
            if not _clean(item):
                raise _unstorable(where or None, item, "the string")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidRequest(f"Invalid '{where or 'body'}': {item} is not a JSON number (NaN and "
                                     "Infinity cannot be recorded).", where or None, "invalid_value")
        elif isinstance(item, dict):
            if depth >= MAX_DEPTH:
                raise _too_deep(where)
            for key, sub in item.items():
                if not isinstance(key, str):
                    continue
                path = f"{where}.{_shown(key)}" if where else _shown(key)
                if not _clean(key):
                    raise _unstorable(path, key, "a field name")
                if isinstance(sub, _WALKED):
                    pending.append((sub, path, depth + 1))
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                raise _too_deep(where)
            for index, sub in enumerate(item):
                if isinstance(sub, _WALKED):
                    pending.append((sub, f"{where}[{index}]", depth + 1))


def _too_deep(where: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{where or 'body'}': nested more than {MAX_DEPTH} levels deep.", where or None,
                          "invalid_value")
