"""The demo's mixed sample workload, submitted through the task and bulk-job APIs and polled until done.

Complex reasoning tasks (premium model, immediate), urgent Light tasks (cheap model, immediate) and
non-urgent Light classification tasks (the batch path: they wait for a provider batch and are shown as
waiting when they have not finished within the wait).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from rich.progress import Progress

from tierbatch.base.states import TERMINAL_TASK_STATUSES as TERMINAL
from tierbatch.cli.stack.local_stack import StackError

IMMEDIATE_GROUPS = ("complex", "light urgent")
BATCH_GROUP = "light batch"

_COMPLEX = [
    ("plan-migration", "A service stores 2 TB in one Postgres table and must move it to a partitioned table "
                       "without downtime. Give a step-by-step plan and the main risks."),
    ("prove-sum", "Prove that the sum of the first n odd numbers is n squared, then explain the idea "
                  "to a twelve-year-old."),
    ("pricing-tradeoff", "A SaaS has 3 pricing tiers and 40% of users on the free tier. Reason about "
                         "whether removing the free tier raises revenue; list the assumptions."),
    ("debug-race", "Two workers sometimes process the same job twice. The queue acks before the work "
                   "is done. Explain the race and propose a fix with idempotency."),
]
_URGENT = [
    ("classify-refund", "classification", "Classify the ticket as billing, account or bug. Answer with one "
                                          "word.\nTicket: I was charged twice for my subscription."),
    ("classify-login", "classification", "Classify the ticket as billing, account or bug. Answer with one "
                                         "word.\nTicket: I cannot log in after resetting my password."),
    ("classify-crash", "classification", "Classify the ticket as billing, account or bug. Answer with one "
                                         "word.\nTicket: The app crashes when I open settings."),
    ("extract-order", "extraction", "Extract the order number and the date as JSON.\n"
                                    "Text: Order #A-1042 was shipped on 2024-05-03."),
    ("extract-contact", "extraction", "Extract the name and email as JSON.\n"
                                      "Text: Please reach Maria Lopez at maria.lopez@example.com."),
    ("extract-amount", "extraction", "Extract the amount and the currency as JSON.\n"
                                     "Text: The invoice total is 1,250.00 EUR."),
]
_BATCH = [
    ("sentiment-1", "The delivery was fast and the product works perfectly."),
    ("sentiment-2", "Terrible support, I waited two weeks for an answer."),
    ("sentiment-3", "It is fine, nothing special."),
    ("sentiment-4", "Best purchase this year, highly recommended."),
    ("sentiment-5", "The box arrived damaged and a part was missing."),
    ("sentiment-6", "Works as described."),
]


@dataclass
class DemoTask:
    label: str
    group: str
    spec: dict[str, Any]
    id: str = ""
    body: dict[str, Any] | None = None

    @property
    def immediate(self) -> bool:
        return self.group in IMMEDIATE_GROUPS

    @property
    def status(self) -> str:
        return str((self.body or {}).get("status") or "unknown")

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


SENTIMENT_LABELS = ["positive", "neutral", "negative"]


def sample_workload() -> list[DemoTask]:
    tasks = [DemoTask(label, "complex", {"prompt": prompt, "task_type": "reasoning", "tier": "complex",
                                         "params": {"max_tokens": 400}})
             for label, prompt in _COMPLEX]
    tasks += [DemoTask(label, "light urgent", {"prompt": prompt, "task_type": task_type, "tier": "light",
                                               "urgent": True, "params": {"max_tokens": 60}})
              for label, task_type, prompt in _URGENT]
    # the batch group is one bulk classification job (POST /v1/jobs): labels, system prompt, template
    tasks += [DemoTask(label, BATCH_GROUP, {"text": text, "task_type": "classification", "tier": "light",
                                            "urgent": False})
              for label, text in _BATCH]
    for task in tasks:
        if task.immediate:
            task.spec["metadata"] = {"demo": task.label}
    return tasks


def submit(client: httpx.Client, tasks: list[DemoTask]) -> None:
    immediate = [t for t in tasks if t.immediate]
    response = client.post("/v1/tasks", json={"tasks": [task.spec for task in immediate]})
    if response.status_code != 202:
        raise StackError(f"POST /v1/tasks answered {response.status_code}: {response.text[:500]}")
    for task, item in zip(immediate, response.json()["data"], strict=True):
        task.id = str(item["id"])
        task.body = item
    batch = [t for t in tasks if not t.immediate]
    if not batch:
        return
    job = client.post("/v1/jobs", json={
        "name": "demo-sentiment", "task_type": "classification", "tier": "light", "urgent": False,
        "system": "Classify the sentiment of the customer review.", "template": "Review: {text}",
        "labels": SENTIMENT_LABELS, "items": [{"id": t.label, "text": t.spec["text"]} for t in batch],
    })
    if job.status_code != 202:
        raise StackError(f"POST /v1/jobs answered {job.status_code}: {job.text[:500]}")
    listed = client.get("/v1/tasks", params={"job_id": job.json()["id"], "limit": 1000})
    by_item = {str(t.get("item_id")): t for t in listed.json()["data"]}
    for task in batch:
        task.body = by_item[task.label]
        task.id = str(task.body["id"])


def poll(client: httpx.Client, tasks: list[DemoTask], wait: float, batch_wait: float,
         progress: Progress) -> None:
    """Poll until every task is terminal or `wait` has passed; stop after `batch_wait` when the immediate
    tasks are done and no batch task has reached a provider batch (the batch path is not moving)."""
    groups = {group: progress.add_task(group, total=sum(1 for t in tasks if t.group == group))
              for group in (*IMMEDIATE_GROUPS, BATCH_GROUP)}
    start = time.monotonic()
    while True:
        for task in tasks:
            if not task.done:
                response = client.get(f"/v1/tasks/{task.id}")
                if response.status_code == 200:
                    task.body = response.json()
        for group, bar in groups.items():
            members = [t for t in tasks if t.group == group]
            waiting = sum(1 for t in members if t.status in ("waiting_batch", "in_batch"))
            suffix = f" ({waiting} waiting for a batch)" if waiting else ""
            progress.update(bar, completed=sum(1 for t in members if t.done), description=group + suffix)
        elapsed = time.monotonic() - start
        immediate_done = all(t.done for t in tasks if t.immediate)
        # batch tasks that were never placed in a provider batch after `batch_wait` will not finish soon
        # (the background lane of a provider without a Batch API runs them instead: moving too)
        batch_stuck = not any(t.status in ("in_batch", "running") or t.done for t in tasks if not t.immediate)
        if (all(t.done for t in tasks) or elapsed >= wait
                or (immediate_done and batch_stuck and elapsed >= batch_wait)):
            return
        time.sleep(0.5)
