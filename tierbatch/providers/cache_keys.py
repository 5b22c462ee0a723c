"""OpenAI's `prompt_cache_key` for a task's calls and batch lines.

Prompt caching: providers cache a request's longest previously seen prefix of 1,024+
tokens and bill it at the cached-input rate. Our requests keep that prefix stable: a job's request is
its system prompt, then the rendered template with the item's text last (`tierbatch.jobs.rows.RequestEncoder`),
and params come after the messages. Where the provider config allows it (`prompt_cache_key`, on by
default), calls also carry OpenAI's `prompt_cache_key` (`prompt_cache_key()` below), which steers
requests with the same prefix to the same cache; it never changes what is answered or billed. A kind
without the field uses the key's presence as its cue to cache the prefix its own way
(`tierbatch.providers.anthropic_messages`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Mapping
from typing import Any

PROMPT_CACHE_KEY_FIELD = "prompt_cache_key"
PROMPT_CACHE_KEY_PREFIX = "tierbatch-"
_MAX_KEY_TASK_TYPE = 40  # "tierbatch-" + 40 + "-" + 8 hex = 59, under OpenAI's 64-character limit
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


@functools.lru_cache(maxsize=4096)
def prompt_cache_key(task_type: str, tenant_id: uuid.UUID | str | None = None) -> str:
    """OpenAI's `prompt_cache_key` for a task: `tierbatch-<task type>-<tenant hash>`.

    Per task type, because the task types of a tenant are what share a system prompt and template.
    Per tenant too (the first 8 hex digits of a SHA-256 of the tenant id, never the id itself): all
    tenants call the provider under one organization, and one key over many tenants' different
    prefixes would crowd a single cache route (OpenAI moves a prefix-and-key pair to more machines
    beyond roughly 15 requests a minute), while tenants' distinct prompts never share a cache entry
    anyway; it also keeps one tenant's requests off the cache routes of another's. It is a routing
    hint, not an isolation guarantee: identical prefixes may still hit the provider's cache across
    keys. Task types that are long or not plain ASCII words are shortened and tagged with a hash.
    """
    name = _KEY_UNSAFE.sub("_", task_type)
    if len(name) > _MAX_KEY_TASK_TYPE or name != task_type:
        digest = hashlib.sha256(task_type.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{name[:_MAX_KEY_TASK_TYPE - 9]}~{digest}"
    if tenant_id is None:
        return PROMPT_CACHE_KEY_PREFIX + name
    tenant = hashlib.sha256(str(tenant_id).encode()).hexdigest()[:8]
    return f"{PROMPT_CACHE_KEY_PREFIX}{name}-{tenant}"


def with_prompt_cache_key(request: Mapping[str, Any], key: str | None) -> Mapping[str, Any]:
    """The request with `prompt_cache_key` added, unless there is no key or the request has its own."""
    if key is None or PROMPT_CACHE_KEY_FIELD in request:
        return request
    return {**request, PROMPT_CACHE_KEY_FIELD: key}
