"""Auto-tiering: a table of prompts with the tier and reason `classify_prompt` must give."""

from __future__ import annotations

import pytest

from tierbatch.base.states import Tier
from tierbatch.routing.tiers import LONG_PROMPT_CHARS, classify_prompt

LIGHT, COMPLEX = Tier.LIGHT, Tier.COMPLEX
SHORT = "auto: short prompt"
CODE = "auto: code in prompt"
CUE = "auto: reasoning cue"
LONG = "auto: long prompt"
TOOLS = "auto: tools requested"

CASES: list[tuple[str, Tier, str]] = [
    # short, plain requests: light
    ("Classify the sentiment of: 'Great product, fast shipping.'", LIGHT, SHORT),
    ("Translate 'good morning' into French.", LIGHT, SHORT),
    ("Extract the invoice number from: INV-2024-0042 due 3 May.", LIGHT, SHORT),
    ("Summarize this review in one sentence: the parcel came late but intact.", LIGHT, SHORT),
    ("Is this email spam? 'You won a free cruise, click here.'", LIGHT, SHORT),
    ("Label this ticket as billing, shipping or other: 'Where is my order?'", LIGHT, SHORT),
    ("What is the capital of Portugal?", LIGHT, SHORT),
    ("Fix the spelling: 'recieve the pakage tommorow'", LIGHT, SHORT),
    ("Give three synonyms for 'quick'.", LIGHT, SHORT),
    ("Detect the language of: 'Wie geht es dir?'", LIGHT, SHORT),
    ("Rewrite politely: 'send me the file now'", LIGHT, SHORT),
    ("Count the words in: 'the quick brown fox'", LIGHT, SHORT),
    ("Name the product category of 'stainless steel saucepan, 24 cm'.", LIGHT, SHORT),
    ("Say hi", LIGHT, SHORT),
    ("Which of these is a fruit: carrot, apple, potato?", LIGHT, SHORT),
    ("Pull the date out of 'Meeting moved to 12 March 2025 at 10:00'.", LIGHT, SHORT),
    ("x" * LONG_PROMPT_CHARS, LIGHT, SHORT),  # at the limit, not over it
    # code: complex
    ("```python\nprint(1)\n```\nWhat does this print?", COMPLEX, CODE),
    ("Why is def parse(line): slow on large files?", COMPLEX, CODE),
    ("Review class Invoice(Base): for missing fields.", COMPLEX, CODE),
    ("#include <stdio.h> fails to compile, what is missing?", COMPLEX, CODE),
    ("Explain function debounce(fn, ms) in plain words.", COMPLEX, CODE),
    # reasoning cues: complex
    ("Solve this step by step: a train leaves at 9 and travels 80 km/h...", COMPLEX, CUE),
    ("Prove that the square root of 2 is irrational.", COMPLEX, CUE),
    ("Derive the closed form of the sum of the first n squares.", COMPLEX, CUE),
    ("Explain the trade-offs of event sourcing for an invoicing system.", COMPLEX, CUE),
    ("Design a rate limiter for a multi-tenant API.", COMPLEX, CUE),
    ("Plan a migration from MySQL to Postgres with no downtime.", COMPLEX, CUE),
    ("Debug this failing deployment: pods restart every 30 seconds.", COMPLEX, CUE),
    ("Why does my cache hit rate drop at midnight?", COMPLEX, CUE),
    ("Refactor the billing module into smaller services.", COMPLEX, CUE),
    ("Think STEP-BY-STEP about which supplier to pick.", COMPLEX, CUE),
    ("Architect a data pipeline for 10 TB a day.", COMPLEX, CUE),
    # long prompts: complex, whatever they say
    ("Summarize: " + "word " * 1500, COMPLEX, LONG),
]


@pytest.mark.parametrize(("text", "tier", "reason"), CASES, ids=[c[0][:40] for c in CASES])
def test_classify_prompt(text: str, tier: Tier, reason: str) -> None:
    decision = classify_prompt(text)
    assert (decision.tier, decision.reason[:len(reason)]) == (tier, reason), decision


@pytest.mark.parametrize("text", ["Say hi", "Prove it", "x" * 10_000])
def test_tools_requested_always_complex(text: str) -> None:
    decision = classify_prompt(text, tools_requested=True)
    assert (decision.tier, decision.reason) == (COMPLEX, TOOLS)


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert {c[1] for c in CASES} == {LIGHT, COMPLEX}
