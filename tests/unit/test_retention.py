"""`[retention]`: validated once like every section; what stays of a labelled answer; the beat entry."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tierbatch.base.config import AppConfig, default_config_data, parse_config
from tierbatch.base.errors import ConfigError
from tierbatch.base.messaging import PARTITIONS_TICK, RETENTION_TICK, TASK_ROUTES
from tierbatch.tasks.labels import label_response_format
from tierbatch.tasks.retention import kept_output
from tierbatch.worker.app import beat_schedule


def config_with(retention: dict[str, Any] | None, cache: dict[str, Any] | None = None) -> AppConfig:
    data = default_config_data()
    if retention is not None:
        data["retention"] = retention
    if cache is not None:
        data["cache"] = cache
    return parse_config(data, environ={})


def test_bodies_are_kept_forever_unless_asked() -> None:
    config = config_with(None)
    assert config.retention.bodies_days is None
    assert all(entry["task"] != RETENTION_TICK for entry in beat_schedule(config).values())


def test_bodies_days_schedules_the_tick_at_its_interval_on_the_batch_queue() -> None:
    config = config_with({"bodies_days": 30, "interval_seconds": 120, "batch_size": 2000})
    assert (config.retention.bodies_days, config.retention.batch_size) == (30, 2000)
    entry = beat_schedule(config)["retention-tick"]
    assert entry["task"] == RETENTION_TICK
    assert entry["schedule"].total_seconds() == 120  # type: ignore[attr-defined]
    assert TASK_ROUTES[RETENTION_TICK] == {"queue": "batch"}


@pytest.mark.parametrize(("retention", "fragment"), [
    ({"bodies_days": 0}, "retention.bodies_days: Input should be greater than or equal to 1"),
    ({"bodies_days": -3}, "retention.bodies_days"),
    ({"bodies_days": "a week"}, "retention.bodies_days"),
    ({"bodies_days": 1.5}, "retention.bodies_days"),
    ({"bodies_days": 7, "batch_size": 0}, "retention.batch_size"),
    ({"bodies_days": 7, "batch_size": 1_000_000}, "retention.batch_size"),
    ({"bodies_days": 7, "interval_seconds": 0}, "retention.interval_seconds"),
    ({"tasks_days": 0}, "retention.tasks_days: Input should be greater than or equal to 1"),
    ({"tasks_days": "a quarter"}, "retention.tasks_days"),
    ({"body_days": 7}, "retention.body_days: unknown key"),
    ({"task_days": 90}, "retention.task_days: unknown key"),
])
def test_bad_retention_values_and_unknown_keys_are_named(retention: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_with(retention)
    assert fragment in str(caught.value)


def test_tasks_are_kept_forever_unless_asked_and_the_partitions_tick_always_runs() -> None:
    kept = config_with(None)
    assert kept.retention.tasks_days is None
    # months ahead are made whether or not anything is dropped
    assert beat_schedule(kept)["partitions-tick"]["task"] == PARTITIONS_TICK
    dropping = config_with({"tasks_days": 400, "bodies_days": 90, "interval_seconds": 600})
    assert (dropping.retention.tasks_days, dropping.retention.bodies_days) == (400, 90)
    entry = beat_schedule(dropping)["partitions-tick"]
    assert entry["schedule"].total_seconds() == 600  # type: ignore[attr-defined]
    assert TASK_ROUTES[PARTITIONS_TICK] == {"queue": "batch"}


def test_cached_answers_may_not_outlive_their_tasks() -> None:
    with pytest.raises(ConfigError, match=r"cache\.ttl_seconds: 172800 keeps cached answers longer than "
                                          r"retention\.tasks_days \(1 days"):
        config_with({"tasks_days": 1}, {"ttl_seconds": 2 * 86_400})
    assert config_with({"tasks_days": 2}, {"ttl_seconds": 2 * 86_400}).cache.ttl_seconds == 172_800


def test_cached_answers_may_not_outlive_the_bodies() -> None:
    with pytest.raises(ConfigError, match=r"cache\.ttl_seconds: 172800 keeps cached answers longer than "
                                          r"retention\.bodies_days \(1 days"):
        config_with({"bodies_days": 1}, {"ttl_seconds": 2 * 86_400})
    assert config_with({"bodies_days": 2}, {"ttl_seconds": 2 * 86_400}).cache.ttl_seconds == 172_800
    # a disabled cache stores nothing, whatever its TTL
    assert not config_with({"bodies_days": 1}, {"enabled": False, "ttl_seconds": 9 * 86_400}).cache.enabled


LABELLED = label_response_format(["spam", "ham"])


@pytest.mark.parametrize(("output", "kept"), [
    ('{"label": "spam"}', {"label": "spam"}),
    ('{"label":"ham","why":"friendly tone, no links"}', {"label": "ham"}),
    ("ham", {"label": "ham"}),
    ('{"label": "eggs"}', None),  # not one of the labels: the answer goes
    ("I think this is spam, because the sender asks for money", None),
    (None, None),
])
def test_a_labelled_answer_keeps_only_its_label(output: str | None, kept: dict[str, str] | None) -> None:
    result = kept_output(output, LABELLED)
    assert (json.loads(result) if result is not None else None) == kept


def test_an_unlabelled_answer_is_removed() -> None:
    assert kept_output('{"label": "spam"}', None) is None
    assert kept_output("spam", {"type": "json_object"}) is None
    assert kept_output("spam", {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}) is None
