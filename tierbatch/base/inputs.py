"""Checks on input bytes before anything is stored or sent to a provider.

Postgres cannot store NUL in text (nor `\\u0000` in jsonb), and a lone surrogate cannot be encoded
to UTF-8 at all; JSON nested without bound exhausts Python's recursion in `json.loads`. These are
refused here with an `InvalidInput` naming the field as the API names fields (`messages[0].content`).

`loads_checked` parses with orjson (C, no recursion; its own depth cap is 1024) and then verifies the
tree: on the common path that costs three byte scans in C, since a body with fewer than
`MAX_JSON_DEPTH` brackets cannot be nested deeper and a body without a NUL escape cannot hold one.
Only when orjson refuses a body does a slower path run (bounded in size) to name the field at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import orjson

from tierbatch.base.errors import InvalidInput

MAX_JSON_DEPTH = 64
# Bodies up to this size that orjson refuses are parsed again by `json` to name the offending field;
# bigger ones are answered with orjson's message (position only).
FALLBACK_MAX_BYTES = 8 * 1024 * 1024

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# a JSON string, escapes included: removed before brackets are counted
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class NotJson(InvalidInput):
    """The bytes are not JSON at all (each surface words this error its own way)."""


class TooDeep(InvalidInput):
    pass


class Unstorable(InvalidInput):
    pass


def unstorable(text: str) -> bool:
    """True when `text` holds a character Postgres cannot store (NUL, a lone surrogate)."""
    if text.isascii():  # the common case: only NUL can be wrong, and `in` is a C scan
        return "\x00" in text
    return _UNSTORABLE.search(text) is not None


def storable_text(text: str) -> str:
    """`text` with NUL characters and lone surrogates replaced by U+FFFD (for what a provider answered:
    it is recorded, never refused)."""
    return _UNSTORABLE.sub("\ufffd", text) if unstorable(text) else text


def storable(value: Any) -> Any:
    """`value` (JSON-like) with every string and key made storable (`storable_text`)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(k) if isinstance(k, str) else k: storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def describe(text: str) -> str:
    """Which kind of unstorable character `text` holds, for an error message."""
    return "a NUL character" if "\x00" in text else "a lone UTF-16 surrogate"


def dotted(path: Iterable[object]) -> str:
    """A field's name as the API's other errors spell it: `messages[0].content`, `metadata.team`."""
    name = ""
    for part in path:
        if type(part) is int:
            name += f"[{part}]"
        else:
            text = _printable(str(part))
            name = f"{name}.{text}" if name else text
    return name


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii") if unstorable(text) else text


def check_text(value: str, param: str) -> None:
    """Refuse a single string (a header, a query parameter, a file name) that cannot be stored."""
    if unstorable(value):
        raise Unstorable(f"{param}: the value holds {describe(value)}, which cannot be stored", param=param)


def too_deep(prefix: str = "") -> TooDeep:
    return TooDeep(f"{prefix}the JSON is nested deeper than {MAX_JSON_DEPTH} levels", param=None)


def check_tree(root: Any, max_depth: int = MAX_JSON_DEPTH, prefix: tuple[object, ...] = ()) -> None:
    """Walk a parsed JSON value without recursion: depth, and every string and key storable."""
    if type(root) is str:
        if unstorable(root):
            raise _unstorable_at(prefix, root)
        return
    if type(root) not in (dict, list):
        return
    stack: list[tuple[Any, tuple[object, ...]]] = [(root, prefix)]
    while stack:
        node, path = stack.pop()
        if len(path) - len(prefix) >= max_depth:
            where = dotted(path)
            raise TooDeep(f"{where}: the JSON is nested deeper than {max_depth} levels", param=where or None)
        items: Iterable[tuple[object, Any]] = node.items() if type(node) is dict else enumerate(node)
        for key, value in items:
            if type(key) is str and unstorable(key):
                where = dotted(path) or "the body"
                raise Unstorable(f"{where}: a key holds {describe(key)}, which cannot be stored",
                                 param=dotted((*path, key)))
            kind = type(value)
            if kind is str:
                if unstorable(value):
                    raise _unstorable_at((*path, key), value)
            elif kind is dict or kind is list:
                stack.append((value, (*path, key)))


def _unstorable_at(path: tuple[object, ...], value: str) -> Unstorable:
    param = dotted(path) or None
    where = f"{param}: " if param else ""
    return Unstorable(f"{where}the value holds {describe(value)}, which cannot be stored", param=param)


def nesting_exceeds(raw: bytes, limit: int) -> bool:
    """True when the brackets of `raw` (strings skipped) may nest deeper than `limit`.

    No loop per byte: strings are cut and everything but brackets deleted (both in C), then each
    pass of `replace` removes the innermost pairs, one level per pass, at most `limit` passes."""
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not skeleton:
            return False
        reduced = skeleton.replace(b"[]", b"").replace(b"{}", b"")
        if len(reduced) == len(skeleton):
            # mismatched or unclosed (not JSON): too deep when json.loads could still recurse that far
            return skeleton.count(b"[") + skeleton.count(b"{") > limit
        skeleton = reduced
    return bool(skeleton)


def loads_checked(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON bytes and check them; raises NotJson, TooDeep or Unstorable (all InvalidInput, 400)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _loads_refused(raw, max_depth, str(exc))
    # cheap proofs first: fewer openers than the limit, no NUL escape (orjson refuses raw NULs and
    # lone surrogates itself)
    shallow = raw.count(b"[") + raw.count(b"{") <= max_depth
    if shallow and b"\\u0000" not in raw:
        return value
    check_tree(value, max_depth)
    return value


def _loads_refused(raw: bytes, max_depth: int, reason: str) -> Any:
    """orjson refused the bytes: say why, naming the field when the body is small enough to look."""
    if len(raw) > FALLBACK_MAX_BYTES:
        raise NotJson(reason)
    if nesting_exceeds(raw, max_depth):
        raise too_deep()
    try:
        # the nesting is bounded now, so this cannot recurse deeply; strict=False to find raw NULs
        value = json.loads(raw, strict=False)
    except (ValueError, UnicodeDecodeError):
        raise NotJson(reason) from None
    check_tree(value, max_depth)
    # storable, within depth, yet refused by orjson (NaN, numbers beyond 64 bits...): json's reading
    return value
