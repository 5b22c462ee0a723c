"""Counters behind `GET /_sim/stats`, so tests can see what reached the provider."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    chat_calls: Counter[str] = field(default_factory=Counter)  # every chat request, per asked model
    chat_errors: Counter[str] = field(default_factory=Counter)  # injected faults, per asked model
    chat_slow: Counter[str] = field(default_factory=Counter)  # injected slow answers, per asked model
    files_created: int = 0
    batches_created: int = 0
    batch_lines: int = 0  # lines of the input files of created batches
    batch_lines_answered: int = 0  # output lines written with status 200
    # requests (chat calls and lines of accepted batch files) per `prompt_cache_key` they carried
    prompt_cache_keys: Counter[str] = field(default_factory=Counter)
    messages_calls: Counter[str] = field(default_factory=Counter)  # every Messages request, per asked model
    messages_errors: Counter[str] = field(default_factory=Counter)  # injected faults there, per asked model
    messages_slow: Counter[str] = field(default_factory=Counter)  # injected slow answers there, per asked model
    message_batches_created: int = 0
    message_batch_requests: int = 0  # requests of created message batches
    # chat answers (immediate and batch lines) of requests that name a task family, per (family, model),
    # and how many of them were the reference model's answer
    family_answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    family_reference_answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    # per answer id (the chat completion's `id`): was it the reference answer; kept only with the
    # config's `record_verdicts`, read through `GET /_sim/verdicts`
    verdicts: dict[str, bool] = field(default_factory=dict)

    def record_answer(self, model: str, answer_id: str, family: str | None, reference: bool | None,
                      keep_verdict: bool) -> None:
        """Count one answer given (a chat completion or a batch line written to the output file)."""
        if reference is None:
            return
        if family is not None:
            self.family_answers[family, model] += 1
            if reference:
                self.family_reference_answers[family, model] += 1
        if keep_verdict:
            self.verdicts[answer_id] = reference

    def family_figures(self) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (family, model), answers in sorted(self.family_answers.items()):
            out.setdefault(family, {})[model] = {
                "answers": answers, "reference": self.family_reference_answers[family, model]}
        return out

    def reset(self) -> None:
        self.chat_calls.clear()
        self.chat_errors.clear()
        self.chat_slow.clear()
        self.files_created = 0
        self.batches_created = 0
        self.batch_lines = 0
        self.batch_lines_answered = 0
        self.prompt_cache_keys.clear()
        self.messages_calls.clear()
        self.messages_errors.clear()
        self.messages_slow.clear()
        self.message_batches_created = 0
        self.message_batch_requests = 0
        self.family_answers.clear()
        self.family_reference_answers.clear()
        self.verdicts.clear()

    def as_dict(self) -> dict[str, Any]:
        return {
            "chat_calls": dict(self.chat_calls),
            "chat_errors": dict(self.chat_errors),
            "chat_slow": dict(self.chat_slow),
            "files_created": self.files_created,
            "batches_created": self.batches_created,
            "batch_lines": self.batch_lines,
            "batch_lines_answered": self.batch_lines_answered,
            "prompt_cache_keys": dict(self.prompt_cache_keys),
            "messages_calls": dict(self.messages_calls),
            "messages_errors": dict(self.messages_errors),
            "messages_slow": dict(self.messages_slow),
            "message_batches_created": self.message_batches_created,
            "message_batch_requests": self.message_batch_requests,
            "family_answers": self.family_figures(),
        }
