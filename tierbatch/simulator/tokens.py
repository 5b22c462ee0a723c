"""A deterministic stand-in tokenizer and the prompt-prefix cache behind `cached_tokens`.

One token is about four characters. A prompt's prefixes are remembered per model at every
128-token boundary from 1,024 tokens on; a later prompt that starts with a remembered prefix
reports that prefix's length as cached (so a prefix is never cached the first time it is seen).

A request's `prompt_cache_key` is not part of the cache's key: at OpenAI it only steers requests to
the machines that likely hold their prefix (better hit rates under load), while a hit still needs an
identical 1,024+ token prefix on the same model. One in-process cache has no routing to improve, so the
simulator only counts the keys it receives (`GET /_sim/stats`, `prompt_cache_keys`).

The Anthropic side (`read_and_write`) shares the cache and its boundaries and adds its own: the end of
every block marked with `cache_control` (a breakpoint) once it is 1,024 tokens in. It also reports the
write: the tokens between the longest prefix read and the longest one now remembered.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

CHARS_PER_TOKEN = 4
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128
DEFAULT_CACHE_ENTRIES = 200_000


def count_tokens(text: str) -> int:
    """Tokens in `text`: a quarter of its characters, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


def content_text(content: Any) -> str:
    """Text of a message `content`: a string, or a list of parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
        return "".join(texts)
    return ""


def prompt_text(messages: list[Any]) -> str:
    """The concatenated contents of the messages, the text that prompt tokens are counted over."""
    return "\n".join(content_text(m.get("content")) if isinstance(m, dict) else "" for m in messages)


class PrefixCache:
    """Per-model memory of prompt prefixes, bounded (oldest forgotten first). Thread-safe."""

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def resize(self, max_entries: int) -> None:
        """A new bound; the oldest entries past it are forgotten now."""
        with self._lock:
            self._max_entries = max_entries
            while len(self._entries) > max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _boundary_digests(text: str, prompt_tokens: int) -> list[tuple[int, bytes]]:
        """(tokens, digest of the first `tokens` tokens) for every cacheable boundary, ascending."""
        top = (prompt_tokens // CACHE_STEP_TOKENS) * CACHE_STEP_TOKENS
        if top < CACHE_MIN_TOKENS:
            return []
        hasher = hashlib.blake2b(digest_size=16)
        out: list[tuple[int, bytes]] = []
        pos = 0
        for tokens in range(CACHE_MIN_TOKENS, top + 1, CACHE_STEP_TOKENS):
            end = tokens * CHARS_PER_TOKEN
            hasher.update(text[pos:end].encode("utf-8", "surrogatepass"))
            pos = end
            out.append((tokens, hasher.copy().digest()))
        return out

    def read_and_write(self, model: str, text: str, prompt_tokens: int,
                       breakpoints: Sequence[int] = ()) -> tuple[int, int]:
        """(tokens read from the cache, tokens written to it) for this prompt; `breakpoints` are character
        offsets in `text` where a marked block ends. Remembers every boundary for the next prompt."""
        ends = {tokens * CHARS_PER_TOKEN: tokens
                for tokens in range(CACHE_MIN_TOKENS, (prompt_tokens // CACHE_STEP_TOKENS) * CACHE_STEP_TOKENS + 1,
                                    CACHE_STEP_TOKENS)}
        for end in breakpoints:
            tokens = count_tokens(text[:end])
            if tokens >= CACHE_MIN_TOKENS and end not in ends:
                ends[min(end, len(text))] = tokens
        if not ends:
            return 0, 0
        hasher = hashlib.blake2b(digest_size=16)
        digests: list[tuple[int, bytes]] = []
        pos = 0
        for end in sorted(ends):
            hasher.update(text[pos:end].encode("utf-8", "surrogatepass"))
            pos = max(pos, end)
            digests.append((ends[end], hasher.copy().digest()))
        read = self._read_and_store(model, digests)
        longest = max(tokens for tokens, _ in digests)
        return read, max(0, longest - read)

    def lookup_and_store(self, model: str, text: str, prompt_tokens: int | None = None) -> int:
        """Cached tokens for this prompt, then remember its prefixes for the next one."""
        if prompt_tokens is None:
            prompt_tokens = count_tokens(text)
        boundaries = self._boundary_digests(text, prompt_tokens)
        if not boundaries:
            return 0
        return self._read_and_store(model, boundaries)

    def _read_and_store(self, model: str, digests: list[tuple[int, bytes]]) -> int:
        """Tokens of the longest prefix already cached (digests in ascending prefix order), then every
        prefix remembered as most recently used; the oldest are dropped past the size limit."""
        read = 0
        with self._lock:
            entries = self._entries
            for tokens, digest in reversed(digests):
                if (model, digest) in entries:
                    read = tokens
                    break
            for _tokens, digest in digests:
                key = (model, digest)
                if key in entries:
                    entries.move_to_end(key)
                else:
                    entries[key] = None
            while len(entries) > self._max_entries:
                entries.popitem(last=False)
        return read
