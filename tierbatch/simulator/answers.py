"""Deterministic answers: the same request always gets the same content.

- A classification request (a `json_schema` response format with a string `enum` anywhere in
  the schema, or a `Labels: a, b, c` line in the prompt) gets a label. The reference label is
  chosen by a hash of the messages; a `reference` model answers it, any other model answers it
  when a hash of (model, messages) falls under its agreement rate, else another label.
- Any other request gets a few sentences derived from a hash of the messages (and, for a model
  that disagrees, of the model), truncated to `max_tokens` / `max_completion_tokens`; with an
  `output_tokens_by_family` range for the request's family, as many sentences as a length drawn
  from that range.
- The agreement rate is the model's `agreement_by_family` entry for the request's task family, else
  its `agreement`. The family is named by the prompt itself: a `Task family: NAME` line in a system
  or developer message (`task_family`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.tokens import CHARS_PER_TOKEN, content_text, count_tokens, prompt_text

_LABELS_LINE = re.compile(r"^[ \t]*labels[ \t]*:[ \t]*(.+?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_FAMILY_LINE = re.compile(r"^[ \t]*task family[ \t]*:[ \t]*([\w.-]+)", re.IGNORECASE | re.MULTILINE)
_INSTRUCTION_ROLES = ("system", "developer")
_MAX_SCHEMA_DEPTH = 32
_WORDS = (
    "the", "system", "request", "provider", "batch", "model", "answer", "result", "quality", "cost",
    "token", "signal", "routine", "careful", "simple", "review", "summary", "customer", "account",
    "billing", "report", "status", "update", "process", "value", "record", "pattern", "context",
    "detail", "outcome", "evidence", "choice", "option", "method", "reason", "task", "queue",
    "window", "latency", "priority", "content", "section", "label", "measure", "stable", "clear",
    "brief", "useful", "likely", "overall", "specific", "general", "recent", "relevant", "main",
    "and", "of", "with", "for", "shows", "suggests", "includes", "describes", "covers", "notes",
)


def stable_hash(*parts: str) -> int:
    """A 64-bit hash of the parts that is the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def unit_hash(*parts: str) -> float:
    """A stable value in [0, 1) from the parts."""
    return stable_hash(*parts) / 2.0**64


def input_key(messages: Any) -> str:
    """Canonical text of the request input (the messages) that every decision is hashed over."""
    if not isinstance(messages, list):
        return json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    parts = []
    for message in messages:
        if (isinstance(message, dict) and len(message) == 2 and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            parts.append(message["role"] + "\x1f" + message["content"])
        else:
            parts.append(json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
    return "\x1e".join(parts)


def task_family(messages: Any) -> str | None:
    """The family named by the first `Task family: NAME` line of the system or developer messages."""
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") in _INSTRUCTION_ROLES:
            match = _FAMILY_LINE.search(content_text(message.get("content")))
            if match:
                return match.group(1).lower()
    return None


# --- classification -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelTask:
    labels: tuple[str, ...]
    schema: dict[str, Any] | None = None  # the json_schema to fill, or None for a bare label
    path: tuple[str, ...] = ()  # property path of the enum inside the schema ("[]": array item)


def resolve_ref(schema: Any, root: dict[str, Any], depth: int) -> Any:
    """The schema a local `$ref` (`#/...`) points at, followed through chains; `{}` for any other ref."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < _MAX_SCHEMA_DEPTH:
        ref = schema["$ref"]
        if not ref.startswith("#"):
            return {}
        node: Any = root
        for part in ref.lstrip("#").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        schema = node if isinstance(node, dict) else {}
        depth += 1
    return schema


def find_enum(schema: Any, root: dict[str, Any], path: tuple[str, ...],
              depth: int) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(property path, labels) of the first string enum in the schema, depth first; None without one."""
    if depth > _MAX_SCHEMA_DEPTH:
        return None
    schema = resolve_ref(schema, root, depth)
    if not isinstance(schema, dict):
        return None
    enum = schema.get("enum")
    if isinstance(enum, list):
        labels = tuple(v for v in enum if isinstance(v, str))
        if labels:
            return path, labels
    props = schema.get("properties")
    if isinstance(props, dict):
        for name, sub in props.items():
            found = find_enum(sub, root, (*path, str(name)), depth + 1)
            if found:
                return found
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list):
            for sub in options:
                found = find_enum(sub, root, path, depth + 1)
                if found:
                    return found
    items = schema.get("items")
    if isinstance(items, dict):
        return find_enum(items, root, (*path, "[]"), depth + 1)
    return None


def response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return spec["schema"]
        return {}
    return None


def labels_from_text(text: str) -> tuple[str, ...]:
    """Labels of the last `Labels: a, b, c` line in the prompt text."""
    found: tuple[str, ...] = ()
    if "abels" not in text and "ABELS" not in text:
        return found
    for match in _LABELS_LINE.finditer(text):
        parts = (part.strip().strip("\"'`").strip() for part in match.group(1).split(","))
        labels = tuple(p for p in parts if p)
        if labels:
            found = labels
    return found


def find_label_task(body: dict[str, Any], text: str | None = None) -> LabelTask | None:
    """The classification asked for, if any; `text` is the prompt text when already known."""
    schema = response_schema(body)
    if schema is not None:
        found = find_enum(schema, schema, (), 0)
        if found:
            path, labels = found
            return LabelTask(labels=labels, schema=schema, path=path)
        return None
    if text is None:
        messages = body.get("messages")
        text = prompt_text(messages) if isinstance(messages, list) else ""
    labels = labels_from_text(text)
    return LabelTask(labels=labels) if labels else None


def reference_label(labels: tuple[str, ...], key: str) -> str:
    return labels[stable_hash("reference", key) % len(labels)]


def agrees(model: str, settings: ModelSettings, key: str, salt: str = "", family: str | None = None) -> bool:
    """Whether this model gives the reference answer to this input (stable per model and input)."""
    return settings.reference or unit_hash("agree", model, key, salt) < settings.agreement_for(family)


def choose_label(labels: tuple[str, ...], model: str, settings: ModelSettings, key: str,
                 salt: str = "", family: str | None = None) -> str:
    return label_for(labels, model, key, salt, len(labels) == 1 or agrees(model, settings, key, salt, family))


def label_for(labels: tuple[str, ...], model: str, key: str, salt: str, agreed: bool) -> str:
    """The reference label when `agreed`, else another one chosen by a hash."""
    ref_index = stable_hash("reference", key) % len(labels)
    if agreed or len(labels) == 1:
        return labels[ref_index]
    shift = 1 + stable_hash("disagree", model, key, salt) % (len(labels) - 1)
    return labels[(ref_index + shift) % len(labels)]


# --- JSON and free text -------------------------------------------------------------------------

def deterministic_text(seed: int) -> str:
    """Two to four sentences of six to fourteen words, all drawn from one hash of `seed`."""
    data = hashlib.blake2b(seed.to_bytes(8, "big"), digest_size=64).digest()
    words = len(_WORDS)
    sentences = []
    pos = 5
    for i in range(2 + data[0] % 3):
        count = 6 + data[1 + i] % 9
        chosen = [_WORDS[b % words] for b in data[pos:pos + count]]
        pos += count
        sentences.append(" ".join(chosen).capitalize() + ".")
    return " ".join(sentences)


def text_of_length(seed: int, low: int, high: int) -> str:
    """Sentences of `deterministic_text` until about a length drawn log-uniformly from [low, high]
    tokens by `seed`, cut at a word's end."""
    wanted = round(low * (high / low) ** unit_hash("length", str(seed))) * CHARS_PER_TOKEN
    parts: list[str] = []
    size = 0
    step = 0
    while size < wanted:
        part = deterministic_text(stable_hash(str(seed), str(step)))
        parts.append(part)
        size += len(part) + 1
        step += 1
    text = " ".join(parts)
    if len(text) > wanted:
        cut = text.rfind(" ", 0, wanted + 1)
        text = text[:cut] if cut > 0 else text[:wanted]
    return text


def _first_type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return str(kinds[0]) if kinds else "null"
    return kind if isinstance(kind, str) else None


def fill_schema(schema: Any, root: dict[str, Any], seed: int, label_path: tuple[str, ...] | None,
                label: str | None, path: tuple[str, ...] = (), depth: int = 0) -> Any:
    """A deterministic instance of a JSON schema; the enum at `label_path` gets `label`."""
    if label_path is not None and path == label_path:
        return label
    schema = resolve_ref(schema, root, depth)
    if not isinstance(schema, dict) or depth > _MAX_SCHEMA_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            on_path = [o for o in options if label_path is not None
                       and find_enum(o, root, path, depth + 1) is not None]
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            chosen = (on_path or non_null or options)[0]
            return fill_schema(chosen, root, seed, label_path, label, path, depth + 1)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = resolve_ref(part, root, depth)
            if isinstance(part, dict):
                merged.update(part)
        return fill_schema(merged, root, seed, label_path, label, path, depth + 1)
    kind = _first_type(schema)
    props = schema.get("properties")
    if kind == "object" or (kind is None and isinstance(props, dict)):
        out: dict[str, Any] = {}
        if isinstance(props, dict):
            for name, sub in props.items():
                sub_path = (*path, str(name))
                out[str(name)] = fill_schema(sub, root, seed, label_path, label, sub_path, depth + 1)
        return out
    if kind == "array":
        return [fill_schema(schema.get("items", {}), root, seed, label_path, label, (*path, "[]"), depth + 1)]
    if kind == "integer":
        return stable_hash(str(seed), *path) % 10
    if kind == "number":
        return round(unit_hash(str(seed), *path), 2)
    if kind == "boolean":
        return stable_hash(str(seed), *path) % 2 == 0
    if kind == "null":
        return None
    words = deterministic_text(stable_hash(str(seed), *path)).split(".")[0]
    return words


# --- whole answer ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call of an answer: its id, the tool's name and the arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Choice:
    content: str
    finish_reason: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(slots=True)
class Answer:
    choices: list[Choice]
    prompt_text: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    family: str | None = None  # the prompt's task family
    reference: bool | None = None  # every choice is the reference model's answer (None: not decided here)


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _one_choice(body: dict[str, Any], task: LabelTask | None, model: str, settings: ModelSettings,
                key: str, index: int, limit: int | None, family: str | None) -> tuple[Choice, bool]:
    """The choice and whether it is the reference model's answer."""
    salt = str(index) if index else ""
    agreed = (task is not None and len(task.labels) == 1) or agrees(model, settings, key, salt, family)
    if task is not None:
        label = label_for(task.labels, model, key, salt, agreed)
        if task.schema is None:
            return Choice(label, "stop"), agreed
        value = fill_schema(task.schema, task.schema, stable_hash("fill", key), task.path, label)
        return Choice(json.dumps(value, ensure_ascii=False), "stop"), agreed
    seed = stable_hash(*(("text", key, salt) if agreed else ("text", key, salt, model)))
    schema = response_schema(body)
    if schema is not None:
        return Choice(json.dumps(fill_schema(schema, schema, seed, None, None), ensure_ascii=False), "stop"), agreed
    length = settings.output_tokens_by_family.get(family) if family is not None else None
    text = text_of_length(seed, *length) if length is not None else deterministic_text(seed)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return Choice(json.dumps({"answer": text}), "stop"), agreed
    if limit is not None and count_tokens(text) > limit:
        return Choice(text[: limit * CHARS_PER_TOKEN], "length"), agreed
    return Choice(text, "stop"), agreed


def build_answer(body: dict[str, Any], model: str, settings: ModelSettings) -> Answer:
    """The answer to a validated chat request (`messages` a list, `n` an int >= 1)."""
    messages = body["messages"]
    key = input_key(messages)
    text = prompt_text(messages)
    task = find_label_task(body, text)
    family = task_family(messages)
    limit = _max_tokens(body)
    n = body.get("n") or 1
    made = [_one_choice(body, task, model, settings, key, i, limit, family) for i in range(n)]
    choices = [choice for choice, _ in made]
    reasoning = settings.reasoning_tokens * n
    visible = sum(count_tokens(c.content) for c in choices)
    reference = all(agreed for _, agreed in made)
    return Answer(choices=choices, prompt_text=text, prompt_tokens=count_tokens(text),
                  completion_tokens=visible + reasoning, reasoning_tokens=reasoning, family=family,
                  reference=reference)
