"""The reference workload of `bench/savings.py`: a week of a team's LLM work, generated from a seed.

Every figure of the workload is in this module, stated once (bench/README.md explains where each comes
from):

- `FAMILIES`: the task types, their share of the tasks, the length of their prompts, the length of the
  simulated answers, how the light model agrees with the reference model on them, and how users submit
  them (`paths`: a nightly schedule, bulk jobs, the OpenAI batch surface, single urgent tasks, single tasks
  with a deadline, the OpenAI-compatible chat endpoint);
- repeats: a share of the items of some types, from the second day on, are an earlier day's request sent
  again through the same path (same prompt, same parameters), so the response cache has something to
  find; `temperature` 0 there, as for any bulk job that wants the same answer twice;
- shared prefixes: most extraction prompts start with the same 1,100-token instruction, so the
  provider's prompt cache matters; the first request with it is made alone (`warm_up`, day 0) so that
  which request pays for it does not depend on the order requests reach the provider.

Nothing here reads the clock or the environment: the same seed and sizes give the same items, texts and
repeats, in the same order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Path = Literal["schedule", "job", "openai_batch", "urgent", "deadline", "later", "gateway"]
PATHS: tuple[Path, ...] = ("schedule", "job", "openai_batch", "urgent", "deadline", "later", "gateway")
# how a path submits: urgent tasks and chat calls want their answer now; the rest can wait for a batch
URGENT_PATHS: frozenset[str] = frozenset({"urgent", "gateway"})
# repeats go through the path of their original, which must cache (the same request, temperature 0)
REPEAT_PATHS: frozenset[str] = frozenset({"schedule", "job", "openai_batch", "urgent", "later"})
DEADLINE_HOURS = 2.0  # `deadline` path: sooner than a batch can promise (config: 24 h), so served immediately
LATER_HOURS = 48.0  # `later` path: a deadline a batch meets
CHARS_PER_TOKEN = 4  # the simulator's tokenizer


# the probabilities of a `Quantiles` table: every 5%, then the tail
QUANTILE_PROBABILITIES = (*tuple(i / 20 for i in range(20)), 0.99, 0.999, 1.0)


@dataclass(frozen=True)
class Quantiles:
    """An empirical distribution: its values at `QUANTILE_PROBABILITIES`, interpolated linearly."""

    points: tuple[int, ...]
    source: str

    def draw(self, rng: random.Random) -> int:
        u = rng.random()
        probabilities = QUANTILE_PROBABILITIES
        i = max(k for k in range(len(probabilities) - 1) if probabilities[k] <= u)
        share = (u - probabilities[i]) / (probabilities[i + 1] - probabilities[i])
        return round(self.points[i] + (self.points[i + 1] - self.points[i]) * share)

    def describe(self) -> str:
        return f"median {self.points[10]:,}, p90 {self.points[18]:,} ({self.source})"


@dataclass(frozen=True)
class LogNormal:
    """Lengths around `median`, spread by `sigma`, cut to [low, high]."""

    median: int
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return max(self.low, min(self.high, round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))))

    def describe(self) -> str:
        p90 = min(self.high, round(self.median * math.exp(1.2816 * self.sigma)))
        return f"median {self.median:,}, p90 {p90:,} (assumed)"


# Azure LLM inference trace 2023 (Patel et al., "Splitwise", ISCA 2024; github.com/Azure/AzurePublicDataset,
# CC-BY 4.0): ContextTokens of its 19,366 conversation and 8,819 coding requests at QUANTILE_PROBABILITIES
# (values under 20 raised to 20: a prompt carries at least its instructions). Means 1,150 and 2,060 tokens
# (the trace's: 1,155 and 2,048).
AZURE_CONVERSATION = Quantiles((20, 181, 207, 372, 387, 396, 403, 414, 703, 984, 1020, 1045, 1071, 1097, 1130,
                                1189, 1315, 1876, 2734, 4083, 4142, 6212, 14050),
                               "Azure LLM inference trace 2023, conversation")
AZURE_CODE = Quantiles((20, 75, 147, 232, 386, 578, 770, 938, 1075, 1261, 1469, 1690, 1909, 2164, 2433, 2745,
                        3192, 3919, 5186, 7302, 7436, 7437, 7437), "Azure LLM inference trace 2023, coding")

Length = Quantiles | LogNormal

QUEUES = ("billing", "account", "bug", "feature_request", "shipping", "other")
INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"}, "invoice_number": {"type": "string"}, "issued_on": {"type": "string"},
        "total": {"type": "number"}, "currency": {"type": "string"},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "description": {"type": "string"}, "amount": {"type": "number"}}}},
    },
    "required": ["vendor", "invoice_number", "total"],
}


@dataclass(frozen=True)
class Family:
    """One task type of the workload."""

    name: str
    share: float  # of all tasks
    light_agreement: float  # share of the light model's answers equal to the reference model's (simulator)
    prompt: Length  # tokens of the item's own text (the instructions come on top)
    output_tokens: tuple[int, int] | None  # free-text answers: [lo, hi] tokens, log-uniform (simulator)
    instruction: str
    paths: tuple[tuple[Path, float], ...]
    repeat_share: float = 0.0  # of its items from day 2 on
    long_instruction_share: float = 0.0  # items whose prompt starts with the shared long instruction
    labels: tuple[str, ...] | None = None
    schema: dict[str, Any] | None = None
    temperature: float = 0.0
    template: str = "{text}"

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.schema is not None:
            params["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": self.name, "schema": self.schema}}
        return params


FAMILIES: tuple[Family, ...] = (
    Family("classification", 0.40, 0.97, LogNormal(160, 0.6, 30, 1500), None,
           "Route the support ticket to one queue.", labels=QUEUES, template="Ticket: {text}",
           paths=(("schedule", 0.35), ("job", 0.55), ("urgent", 0.05), ("deadline", 0.05)), repeat_share=0.08),
    Family("extraction", 0.20, 0.98, LogNormal(400, 0.7, 60, 4000), None,
           "Extract the invoice's fields as JSON.", schema=INVOICE_SCHEMA, template="Document:\n{text}",
           paths=(("job", 0.50), ("openai_batch", 0.30), ("urgent", 0.10), ("deadline", 0.10)),
           repeat_share=0.05, long_instruction_share=0.6),
    Family("summarization", 0.12, 0.97, LogNormal(1500, 0.6, 250, 8000), (80, 300),
           "Summarize the document in one paragraph for the account manager.", template="Document:\n{text}",
           paths=(("job", 0.60), ("later", 0.20), ("urgent", 0.20)), repeat_share=0.04),
    Family("chat", 0.10, 0.97, AZURE_CONVERSATION, (41, 451), "You are the assistant in our customer app.",
           paths=(("gateway", 0.80), ("urgent", 0.20)), temperature=0.7),
    Family("reasoning", 0.08, 0.60, LogNormal(800, 0.8, 100, 6000), (250, 1200),
           "Work through the problem step by step, then give the answer.",
           paths=(("job", 0.60), ("urgent", 0.30), ("deadline", 0.10)), temperature=0.2),
    Family("code", 0.10, 0.75, AZURE_CODE, (6, 90), "Complete or fix the code.",
           paths=(("gateway", 0.50), ("urgent", 0.20), ("job", 0.30)), temperature=0.2),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}
LONG_INSTRUCTION_TOKENS = 1100  # over the provider's 1,024-token prompt-cache minimum
WORDS = (
    "account", "invoice", "order", "payment", "refund", "customer", "delivery", "address", "contract", "renewal",
    "report", "quarter", "revenue", "margin", "supplier", "shipment", "warehouse", "ticket", "login", "password",
    "error", "screen", "release", "feature", "request", "budget", "forecast", "meeting", "summary", "policy",
    "the", "a", "of", "and", "to", "in", "for", "with", "on", "was", "is", "we", "our", "their", "after", "before",
    "please", "again", "since", "because", "while", "total", "amount", "date", "number", "status", "team",
    "manager", "update", "issue", "problem", "question", "answer", "month", "week", "day", "plan", "risk",
    "value", "price", "cost", "service", "product", "version", "system", "data", "file", "page", "item", "line",
)


def family_line(name: str) -> str:
    """How a prompt names its task family to the simulator (`tierbatch.simulator.answers.task_family`)."""
    return f"Task family: {name}"


@dataclass
class Item:
    """One task of the workload, as a user submits it."""

    key: str  # unique: the job item id, the task's idempotency key, the batch line's custom_id
    family: str
    day: int
    path: Path
    system: str
    text: str
    repeat_of: str | None = None  # the earlier item with the same request (a cacheable repeat)
    tier: str | None = None  # an explicit tier (the warm-up only); else the router decides

    @property
    def urgent(self) -> bool:
        return self.path in URGENT_PATHS

    def user_content(self) -> str:
        return FAMILY_BY_NAME[self.family].template.replace("{text}", self.text)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user_content()}]

    def prompt_tokens(self) -> int:
        """Prompt tokens as the simulator counts them (the messages' contents joined by newlines)."""
        return -(-(len(self.system) + 1 + len(self.user_content())) // CHARS_PER_TOKEN)


@dataclass
class Day:
    number: int
    items: list[Item] = field(default_factory=list)

    def by_path(self, path: Path) -> list[Item]:
        return [item for item in self.items if item.path == path]


def _rng(seed: int, *parts: object) -> random.Random:
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


class Texts:
    """Item texts: a unique head (the item's key) and a slice of one seeded corpus of words."""

    def __init__(self, seed: int, stream: str, size_chars: int = 3_000_000) -> None:
        words = _rng(seed, "corpus").choices(WORDS, k=size_chars // 5)
        self.corpus = " ".join(words)
        self.rng = _rng(seed, "offsets", stream)

    def make(self, key: str, tokens: int) -> str:
        head = f"[{key}] "
        chars = max(tokens * CHARS_PER_TOKEN - len(head), 1)
        start = self.rng.randrange(0, len(self.corpus) - chars - 1)
        return head + self.corpus[start:start + chars].strip()


def instructions(seed: int) -> dict[tuple[str, bool], str]:
    """The system prompt of each (family, long instruction?)."""
    out: dict[tuple[str, bool], str] = {}
    corpus = Texts(seed, "instructions")
    for family in FAMILIES:
        out[family.name, False] = f"{family.instruction}\n{family_line(family.name)}"
        if family.long_instruction_share:
            rules = corpus.make(f"{family.name}-instruction", LONG_INSTRUCTION_TOKENS)
            out[family.name, True] = f"{family.instruction}\n{family_line(family.name)}\nRules and examples:\n{rules}"
    return out


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split by `weights`, largest remainders first (the same split every time)."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def warm_up(seed: int) -> list[Item]:
    """Day 0: one extraction task with the shared long instruction on each model, one after the other
    (the complex model first), so that every later request with it finds it in the provider's cache."""
    system = instructions(seed)["extraction", True]
    texts = Texts(seed, "warm-up")
    return [Item(f"d0-extraction-warm-{tier}", "extraction", 0, "urgent", system,
                 texts.make(f"d0-extraction-warm-{tier}", 300), tier=tier) for tier in ("complex", "light")]


def generate(seed: int, tasks: int, days: int) -> Iterator[Day]:
    """The workload's days, 1 to `days`, each with its share of the `tasks`."""
    systems = instructions(seed)
    texts = Texts(seed, "items")
    per_family = apportion(tasks, [f.share for f in FAMILIES])
    # earlier requests that may be sent again: (family, path, long instruction?) -> [(key, text)]
    pools: dict[tuple[str, str, bool], list[tuple[str, str]]] = {}
    for number in range(1, days + 1):
        day = Day(number)
        originals: list[tuple[tuple[str, str, bool], tuple[str, str]]] = []
        for family, total in zip(FAMILIES, per_family, strict=True):
            count = apportion(total, [1.0] * days)[number - 1]
            rng = _rng(seed, family.name, number)
            path_names = [path for path, _ in family.paths]
            path_weights = [weight for _, weight in family.paths]
            for index in range(count):
                key = f"d{number}-{family.name}-{index:06d}"
                path = rng.choices(path_names, path_weights)[0]
                long = rng.random() < family.long_instruction_share
                pool = pools.get((family.name, path, long), [])
                repeat = (number > 1 and path in REPEAT_PATHS and bool(pool) and family.temperature == 0
                          and rng.random() < family.repeat_share)
                if repeat:
                    original, text = pool[rng.randrange(len(pool))]
                    day.items.append(Item(key, family.name, number, path, systems[family.name, long], text,
                                          repeat_of=original))
                    continue
                text = texts.make(key, family.prompt.draw(rng))
                day.items.append(Item(key, family.name, number, path, systems[family.name, long], text))
                if path in REPEAT_PATHS and family.repeat_share:
                    originals.append(((family.name, path, long), (key, text)))
        # repeats come from earlier days only: identical requests in flight at once are a race of the cache
        # (which one answers first), not a repeat
        for where, request in originals:
            pool = pools.setdefault(where, [])
            if len(pool) < 400 * number:  # bounded: a few hundred originals per day and kind are plenty
                pool.append(request)
        yield day


def sim_family_tables() -> tuple[dict[str, float], dict[str, list[int]]]:
    """The simulator's per-family tables: the light model's agreement, and answer lengths for every model."""
    agreement = {family.name: family.light_agreement for family in FAMILIES}
    lengths = {family.name: list(family.output_tokens) for family in FAMILIES if family.output_tokens}
    return agreement, lengths


def prompt_cache_entries_bound(items: Sequence[Item], models: int = 2) -> int:
    """At most how many prefixes the simulator's prompt cache stores for these items on `models` models
    (one per 128 tokens from 1,024 on, per model): sized above it, it never forgets one, so cached tokens
    do not depend on the order requests arrive in."""
    entries = 0
    for item in items:
        tokens = item.prompt_tokens() + 64  # the template's few characters, rounded up generously
        if tokens >= 1024:
            entries += (tokens - 1024) // 128 + 1
    return entries * models
