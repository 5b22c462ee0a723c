"""The savings bench's reference workload (bench/savings_workload.py): the same seed gives the same items,
repeats are earlier days' requests sent again through the same path, and the mix is the stated one."""

from __future__ import annotations

from collections import Counter

from bench.savings_workload import FAMILIES, FAMILY_BY_NAME, REPEAT_PATHS, Item, generate, warm_up

TASKS, DAYS = 6000, 3


def workload(seed: int) -> list[Item]:
    return [item for day in generate(seed, TASKS, DAYS) for item in day.items]


def test_the_same_seed_gives_the_same_items_and_another_seed_others() -> None:
    first, again, other = workload(7), workload(7), workload(8)
    assert [(i.key, i.path, i.system, i.text, i.repeat_of) for i in first] == \
        [(i.key, i.path, i.system, i.text, i.repeat_of) for i in again]
    assert [i.text for i in first] != [i.text for i in other]
    assert len({i.key for i in first}) == len(first) == TASKS
    assert {i.key for i in warm_up(7)}.isdisjoint(i.key for i in first)


def test_repeats_are_earlier_days_requests_through_the_same_path() -> None:
    items = workload(7)
    by_key = {item.key: item for item in items}
    repeats = [item for item in items if item.repeat_of]
    assert repeats
    for item in repeats:
        original = by_key[item.repeat_of or ""]
        assert original.day < item.day and original.path == item.path and original.family == item.family
        assert (original.system, original.text) == (item.system, item.text)
        assert item.path in REPEAT_PATHS and FAMILY_BY_NAME[item.family].temperature == 0
    # nothing else repeats: every other request is unique
    originals = [(i.system, i.text) for i in items if not i.repeat_of]
    assert len(set(originals)) == len(originals)


def test_the_mix_is_the_stated_one() -> None:
    items = workload(7)
    counts = Counter(item.family for item in items)
    for family in FAMILIES:
        assert counts[family.name] == round(TASKS * family.share)
        paths = Counter(item.path for item in items if item.family == family.name)
        for path, share in family.paths:
            assert abs(paths[path] / counts[family.name] - share) < 0.05, (family.name, path)
        assert set(paths) <= {path for path, _ in family.paths}
    # every prompt names its family to the simulator; the shared instruction is over the prompt cache's minimum
    assert all(f"Task family: {item.family}" in item.system for item in items)
    long = [item for item in items if "Rules and examples" in item.system]
    assert long and all(len(item.system) // 4 >= 1024 for item in long)
