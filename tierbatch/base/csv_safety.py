"""CSV cells that a spreadsheet will not run as formulas (OWASP "CSV injection").

A cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage return is read by Excel, LibreOffice and
Google Sheets as a formula (`=HYPERLINK(...)`, `@SUM(...)`, DDE calls). Model answers and item ids come
from tenants and providers, so every CSV we write passes its cells through `safe_cell`, which prefixes
such a cell with a single quote: shown as text, never evaluated.
"""

from __future__ import annotations

from typing import Any

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """`value` unchanged unless it is a string a spreadsheet would evaluate; then `'` + value."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def safe_row(row: dict[str, Any]) -> dict[str, Any]:
    """Every cell of a `csv.DictWriter` row through `safe_cell`."""
    return {key: safe_cell(value) for key, value in row.items()}
