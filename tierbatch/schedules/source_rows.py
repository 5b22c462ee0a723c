"""What a source yields: rows of (item id, text, cursor), and the error that fails a run.

Everything that can go wrong at fire time (no such file, a bad row, an unavailable source, a failing
query) raises `SourceError` with a reason for the run. A reason never quotes a file's content (no header,
no line), and never names an environment variable; no source writes to our database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class SourceError(Exception):
    """The source cannot be read; the run fails with this reason."""



@dataclass(frozen=True, slots=True)
class SourceRow:
    item_id: str
    text: str | None  # None: nothing to classify (empty or missing text); the row is skipped
    cursor: Any = None


def item_id_of(value: Any, where: str, id_field: str) -> str:
    if isinstance(value, bool) or value is None:
        raise SourceError(f"{where}: field {id_field!r} is missing or not a string or integer")
    if isinstance(value, int | uuid.UUID | Decimal):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{where}: field {id_field!r} must be a non-empty string or an integer")
    return value


def item_text_of(value: Any, where: str, text_field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SourceError(f"{where}: field {text_field!r} must be a string")
    return value if value.strip() else None
