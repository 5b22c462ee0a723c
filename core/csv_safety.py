"""Cells of the CSV files tierbatch writes, made safe to open in a spreadsheet.

Tenant input (item ids, answers, error text) ends up in CSV cells; a cell that begins with one of these
characters is read as a formula by Excel, LibreOffice and Google Sheets (`=HYPERLINK(…)`, `@SUM(…)`,
DDE payloads). A leading apostrophe makes the spreadsheet show the text as it is.
"""

from __future__ import annotations

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: str) -> str:
    """`value`, with a leading `'` when a spreadsheet would take it for a formula."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value
