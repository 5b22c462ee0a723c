"""The batch's input file: one JSONL line per task still in the batch, streamed from the database.

It takes a session and never commits; the worker owns the transaction.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.db.models import ProviderBatch
from tierbatch.providers.cache_keys import prompt_cache_key

ENDPOINT = "/v1/chat/completions"


def write_batch_file(session: Session, batch: ProviderBatch, path: Path, config: AppConfig | None = None
                     ) -> tuple[int, int]:
    """Stream the batch's JSONL to `path`; returns (lines, bytes). One line per task still in it.

    Each line's body carries the task's `prompt_cache_key` (`tierbatch.providers.cache_keys.prompt_cache_key`: per task
    type and tenant) unless its request brings its own, or `config` says the batch's provider does not
    take one (without `config`, keys are sent: the provider default).
    """
    keyed = config is None or config.provider(batch.provider).prompt_cache_key
    prefix = '{"custom_id":"%s","method":"POST","url":"' + ENDPOINT + '","body":{"model":' + json.dumps(
        batch.model) + ","
    keys: dict[tuple[str, uuid.UUID], str] = {}  # the key's JSON and a comma, per (task type, tenant)
    lines = 0
    size = 0
    result = session.execute(
        text("SELECT id, request::text AS body, task_type, tenant_id, request ? 'prompt_cache_key' AS has_key "
             "FROM tasks WHERE batch_id = :batch AND status = 'in_batch' ORDER BY id"),
        {"batch": batch.id},
        execution_options={"yield_per": 5000},
    )
    with path.open("w", encoding="utf-8") as handle:
        for row in result:
            # splice the stored request object after "model": the body is {"model": ..., **request}
            key = ""
            if keyed and not row.has_key and len(row.body) > 2:
                key = keys.get((row.task_type, row.tenant_id), "")
                if not key:
                    key = keys[(row.task_type, row.tenant_id)] = '"prompt_cache_key":' + json.dumps(
                        prompt_cache_key(row.task_type, row.tenant_id)) + ","
            line = (prefix % row.id) + key + row.body[1:] + "}\n"
            handle.write(line)
            lines += 1
            size += len(line.encode())
    return lines, size
