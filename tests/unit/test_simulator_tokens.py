"""Tokens and the prompt-prefix cache behind `cached_tokens`."""

from __future__ import annotations

from tierbatch.simulator.tokens import PrefixCache, count_tokens, prompt_text


def test_count_tokens() -> None:
    assert count_tokens("") == 0
    assert count_tokens("abc") == 1
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2


def test_prompt_text_joins_contents() -> None:
    msgs = [{"role": "system", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]
    assert prompt_text(msgs) == "a\nb\n"


def test_short_prompts_are_never_cached() -> None:
    cache = PrefixCache()
    text = "y" * (4 * 1023)
    assert cache.lookup_and_store("m", text) == 0
    assert cache.lookup_and_store("m", text) == 0
    assert len(cache) == 0


def test_first_time_not_cached_then_128_token_steps() -> None:
    cache = PrefixCache()
    system = "s" * (4 * 1200)  # 1,200 tokens of shared prefix
    first = system + "q" * (4 * 135)  # 1,335 tokens
    assert cache.lookup_and_store("m", first) == 0
    assert cache.lookup_and_store("m", first) == 1280  # the longest 128-step prefix of the prompt
    other = system + "z" * (4 * 300)  # shares 1,200 tokens with `first`
    assert cache.lookup_and_store("m", other) == 1152
    assert cache.lookup_and_store("m", other) == 1408  # 1,500 tokens: its own prefixes are now known


def test_cache_is_per_model_and_clears() -> None:
    cache = PrefixCache()
    text = "p" * (4 * 2000)
    cache.lookup_and_store("a", text)
    assert cache.lookup_and_store("b", text) == 0
    assert cache.lookup_and_store("a", text) == 1920
    cache.clear()
    assert cache.lookup_and_store("a", text) == 0


def test_cache_is_bounded() -> None:
    cache = PrefixCache(max_entries=10)
    prompts = [f"{i:02d}" * (2 * 1100) for i in range(20)]  # 1,100 tokens: one cached prefix each
    for prompt in prompts:
        cache.lookup_and_store("m", prompt)
    assert len(cache) == 10
    assert cache.lookup_and_store("m", prompts[19]) == 1024
    assert cache.lookup_and_store("m", prompts[0]) == 0  # the oldest was forgotten


def test_every_step_is_a_multiple_of_128_from_1024() -> None:
    cache = PrefixCache()
    base = "".join(chr(65 + i % 26) for i in range(4 * 4000))
    cache.lookup_and_store("m", base)
    for tokens in (1000, 1024, 1100, 1151, 1152, 2047, 3999):
        cached = cache.lookup_and_store("m", base[: 4 * tokens] + "!different tail" * 50)
        expected = 0 if tokens < 1024 else tokens // 128 * 128
        assert cached == expected, tokens
