"""Tool calls' arguments, generated from the tool's JSON schema; shared by the OpenAI and Anthropic sides.

The arguments are a valid instance of the schema (types, `required`, enums and consts, nested objects
and arrays, string lengths and formats, number bounds and `multipleOf`; `$ref`, `anyOf`/`oneOf`/`allOf`)
and deterministic: the same request gets the same arguments. A tool whose schema holds a string enum is
a classification: its first enum gets the label that `answers.choose_label` gives (the reference label,
or another one as `agreement` says), like a `json_schema` response format on the chat side. The other
values are drawn from a hash of the input, and of the model too when the model disagrees on it.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from tierbatch.simulator.answers import (
    agrees,
    choose_label,
    deterministic_text,
    find_enum,
    resolve_ref,
    stable_hash,
    unit_hash,
)
from tierbatch.simulator.config import ModelSettings

_MAX_DEPTH = 32
_NO_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
_FORMATS = {
    "date-time": "2024-05-01T12:00:00Z",
    "date": "2024-05-01",
    "time": "12:00:00Z",
    "email": "someone@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/resource",
    "url": "https://example.com/resource",
}


@dataclass(frozen=True)
class ToolSpec:
    """A function a request offers: its name and the JSON schema of its arguments."""

    name: str
    schema: dict[str, Any]


def offered_schema(schema: Any) -> dict[str, Any]:
    """The arguments' schema of a tool as offered (an absent or non-object one takes no arguments)."""
    return schema if isinstance(schema, dict) else dict(_NO_SCHEMA)


def pick_tool(tools: list[ToolSpec], key: str) -> ToolSpec:
    """The tool a request that requires one, without naming it, gets called (stable per input)."""
    return tools[stable_hash("tool", key) % len(tools)]


def tool_call_id(prefix: str, key: str, name: str, salt: str = "") -> str:
    """A call id that is the same for the same request (`call_...` at OpenAI, `toolu_...` at Anthropic)."""
    return prefix + f"{stable_hash('call-id', key, name, salt):016x}{stable_hash('call-id-2', key, salt):08x}"[:24]


def tool_arguments(tool: ToolSpec, key: str, model: str, settings: ModelSettings, salt: str = "") -> dict[str, Any]:
    """The arguments of a call of `tool` for the input `key` (`answers.input_key`) by `model`."""
    schema = tool.schema
    found = find_enum(schema, schema, (), 0)
    label_path: tuple[str, ...] | None = None
    label: str | None = None
    if found is not None:
        label_path, labels = found
        label = choose_label(labels, model, settings, key, salt)
    parts = ("args", key, tool.name, salt) if agrees(model, settings, key, salt) else (
        "args", key, tool.name, salt, model)
    value = schema_instance(schema, schema, str(stable_hash(*parts)), label_path, label)
    return value if isinstance(value, dict) else {}


def arguments_json(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def _merged(parts: list[Any], root: dict[str, Any], depth: int) -> dict[str, Any]:
    """An `allOf` as one schema: properties and `required` united, the other keys of later parts winning."""
    merged: dict[str, Any] = {}
    props: dict[str, Any] = {}
    required: list[str] = []
    for part in parts:
        part = resolve_ref(part, root, depth)
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("allOf"), list):
            part = {**{k: v for k, v in part.items() if k != "allOf"}, **_merged(part["allOf"], root, depth + 1)}
        props.update(part.get("properties") or {})
        required.extend(r for r in part.get("required") or () if r not in required)
        merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
    if props:
        merged["properties"] = props
    if required:
        merged["required"] = required
    return merged


def _kind(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return str(kinds[0]) if kinds else "null"
    if isinstance(kind, str):
        return kind
    if isinstance(schema.get("properties"), dict) or isinstance(schema.get("required"), list):
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _string(schema: dict[str, Any], seed: str, path: tuple[str, ...]) -> str:
    fmt = schema.get("format")
    if fmt == "uuid":
        text = str(uuid.UUID(int=stable_hash(seed, *path) << 64 | stable_hash("uuid", seed, *path)))
    elif isinstance(fmt, str) and fmt in _FORMATS:
        text = _FORMATS[fmt]
    else:
        text = deterministic_text(stable_hash(seed, *path)).split(".")[0]
    low = schema.get("minLength")
    high = schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text = ((text + " ") * (low // (len(text) + 1) + 1))[:low]
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def _bounds(schema: dict[str, Any], integer: bool) -> tuple[float, float]:
    low, high = -math.inf, math.inf
    step = 1 if integer else 0.01
    if isinstance(schema.get("minimum"), int | float):
        low = schema["minimum"]
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = max(low, schema["exclusiveMinimum"] + step)
    if isinstance(schema.get("maximum"), int | float):
        high = schema["maximum"]
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = min(high, schema["exclusiveMaximum"] - step)
    return low, high


def _number(schema: dict[str, Any], seed: str, path: tuple[str, ...], integer: bool) -> int | float:
    low, high = _bounds(schema, integer)
    lo = low if low != -math.inf else (min(0.0, high - 10) if high != math.inf else 0.0)
    hi = high if high != math.inf else lo + 10
    if hi < lo:
        hi = lo
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and multiple > 0:
        first, last = math.ceil(lo / multiple), math.floor(hi / multiple)
        count = max(last - first + 1, 1)
        k = first + stable_hash(seed, *path) % count
        return int(k * multiple) if integer and float(k * multiple).is_integer() else k * multiple
    if integer:
        first, last = math.ceil(lo), math.floor(hi)
        return first + stable_hash(seed, *path) % max(last - first + 1, 1)
    value = round(lo + unit_hash(seed, *path) * (hi - lo), 2)
    return min(max(value, lo), hi)


def _array(schema: dict[str, Any], root: dict[str, Any], seed: str, label_path: tuple[str, ...] | None,
           label: str | None, path: tuple[str, ...], depth: int) -> list[Any]:
    prefix = schema.get("prefixItems")
    prefix = prefix if isinstance(prefix, list) else []
    items = schema.get("items", {})
    low = schema.get("minItems")
    high = schema.get("maxItems")
    count = max(low if isinstance(low, int) else 1, len(prefix))
    if isinstance(high, int):
        count = min(count, high)
    out = []
    for i in range(count):
        sub = prefix[i] if i < len(prefix) else items
        sub_path = (*path, "[]") if i == 0 else (*path, f"[{i}]")
        value = schema_instance(sub, root, seed, label_path, label, sub_path, depth + 1)
        if schema.get("uniqueItems") and value in out:
            enum = resolve_ref(sub, root, depth + 1)
            options = enum.get("enum") if isinstance(enum, dict) else None
            if isinstance(options, list):
                value = next((o for o in options if o not in out), value)
        out.append(value)
    return out


def schema_instance(schema: Any, root: dict[str, Any], seed: str, label_path: tuple[str, ...] | None = None,
                    label: str | None = None, path: tuple[str, ...] = (), depth: int = 0) -> Any:
    """A deterministic value valid against `schema` (resolved in `root`); the enum at `label_path` is `label`."""
    schema = resolve_ref(schema, root, depth)
    if schema is True or depth > _MAX_DEPTH:
        return _string({}, seed, path)
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        if label_path is not None and path == label_path and label in enum:
            return label
        return enum[stable_hash("enum", seed, *path) % len(enum)]
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        merged = _merged([rest, *schema["allOf"]], root, depth)
        return schema_instance(merged, root, seed, label_path, label, path, depth + 1)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            on_path = [o for o in options if label_path is not None
                       and find_enum(o, root, path, depth + 1) is not None]
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            chosen = (on_path or non_null or options)[0]
            if isinstance(chosen, dict) and len(schema) > 1:  # sibling keywords apply as well
                chosen = _merged([{k: v for k, v in schema.items() if k != key}, chosen], root, depth)
            return schema_instance(chosen, root, seed, label_path, label, path, depth + 1)
    kind = _kind(schema)
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        out: dict[str, Any] = {}
        for name, sub in props.items():
            out[str(name)] = schema_instance(sub, root, seed, label_path, label, (*path, str(name)), depth + 1)
        for name in schema.get("required") or ():
            if isinstance(name, str) and name not in out:
                extra = schema.get("additionalProperties")
                sub = extra if isinstance(extra, dict) else {"type": "string"}
                out[name] = schema_instance(sub, root, seed, label_path, label, (*path, name), depth + 1)
        return out
    if kind == "array":
        return _array(schema, root, seed, label_path, label, path, depth)
    if kind == "integer":
        return _number(schema, seed, path, integer=True)
    if kind == "number":
        return _number(schema, seed, path, integer=False)
    if kind == "boolean":
        return stable_hash("bool", seed, *path) % 2 == 0
    if kind == "null":
        return None
    return _string(schema, seed, path)
