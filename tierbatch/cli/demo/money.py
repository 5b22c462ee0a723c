"""How the demo reads and writes amounts of money (the API sends them as decimal strings)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any


def to_decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def money(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


def amount(value: Any) -> str:
    amount = to_decimal(value)
    return "-" if amount is None else money(amount)
