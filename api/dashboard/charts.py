"""Chart specifications for static/dashboard.js: plain JSON (numbers as floats, labels as text), read from a
`<script type="application/json">` block, so no script is ever inline and no tenant string is code."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any


def amount(value: Decimal | None) -> float:
    return float(value) if value is not None else 0.0


def dataset(label: str, data: Sequence[Any], *, kind: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"label": label, "data": list(data)}
    if kind is not None:
        spec["type"] = kind
    return spec


def chart(chart_id: str, kind: str, labels: Sequence[str], datasets: list[dict[str, Any]], *,
          title: str, money: bool = False, percent: bool = False, horizontal: bool = False,
          axis_title: str | None = None) -> dict[str, Any]:
    return {"id": chart_id, "type": kind, "labels": list(labels), "datasets": datasets, "title": title,
            "money": money, "percent": percent, "horizontal": horizontal, "axisTitle": axis_title}
