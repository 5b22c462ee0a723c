"""Simulator settings: TOML loading, per-model merging, run-time patches, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierbatch.simulator.config import SimConfig, SimConfigError, load_sim_config, merge_sim_config, parse_sim_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sim.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_sim_config(None)
    assert config.api_key == ""
    assert config.batch.validating_seconds == 1.0
    assert config.batch.in_progress_seconds == 5.0
    assert config.batch.enqueued_token_limit == 0
    settings = config.model_settings("anything")
    assert settings.latency_ms == (20.0, 80.0)
    assert settings.agreement == 0.95
    assert settings.error_status == 500
    assert settings.retry_after_seconds == 1.0
    assert not settings.reference


def test_design_example_loads_and_merges_per_model(tmp_path: Path) -> None:
    path = write(tmp_path, """
api_key = "sk-test"
[batch]
validating_seconds = 0.5
in_progress_seconds = 2
finalizing_seconds = 0.5
line_error_rate = 0.1
expire = true
enqueued_token_limit = 1000
[models."*"]
latency_ms = [5, 10]
agreement = 0.8
error_rate = 0.0
error_status = 503
[models."gpt-4o"]
reference = true
served_as = "gpt-4o-2024-08-06"
[models."flaky"]
error_rate = 0.5
error_status = 429
retry_after_seconds = 2.5
""")
    config = load_sim_config(path)
    assert config.api_key == "sk-test"
    assert config.batch.expire is True
    assert config.batch.enqueued_token_limit == 1000
    ref = config.model_settings("gpt-4o")
    assert ref.reference and ref.served_as == "gpt-4o-2024-08-06"
    assert ref.latency_ms == (5.0, 10.0)  # from "*"
    assert ref.error_status == 503  # from "*"
    flaky = config.model_settings("flaky")
    assert (flaky.error_rate, flaky.error_status, flaky.retry_after_seconds) == (0.5, 429, 2.5)
    assert flaky.agreement == 0.8
    other = config.model_settings("not-configured")
    assert other == config.model_settings("*")
    assert config.named_models() == ["gpt-4o", "flaky"]


def test_round_trip_keeps_only_written_keys(tmp_path: Path) -> None:
    config = load_sim_config(write(tmp_path, '[models."m"]\nagreement = 0.5\n'))
    dumped = config.model_dump(mode="json")
    assert dumped["models"]["m"] == {"agreement": 0.5}
    assert SimConfig.model_validate(dumped) == config


@pytest.mark.parametrize(("text", "fragment"), [
    ("unknown = 1\n", "unknown"),
    ("[batch]\nvalidating_secs = 1\n", "batch.validating_secs"),
    ('[models."m"]\nlatency = [1, 2]\n', "models.m.latency"),
    ('[models."m"]\nagreement = 1.5\n', "agreement"),
    ('[models."m"]\nerror_rate = -0.1\n', "error_rate"),
    ('[models."m"]\nerror_status = 418\n', "error_status"),
    ('[models."m"]\nlatency_ms = [50, 10]\n', "latency_ms"),
    ('[models."m"]\nlatency_ms = [1, 2, 3]\n', "latency_ms"),
    ("[batch]\nline_error_rate = 2\n", "line_error_rate"),
    ("[batch]\nline_error_kinds = [\"boom\"]\n", "line_error_kinds"),
    ("[batch]\nenqueued_token_limit = -1\n", "enqueued_token_limit"),
    ('api_key = 5\n', "api_key"),
])
def test_bad_values_raise_a_clear_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SimConfigError) as info:
        load_sim_config(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match="invalid TOML"):
        load_sim_config(write(tmp_path, "api_key = \n"))
    with pytest.raises(SimConfigError, match="cannot read"):
        load_sim_config(tmp_path / "missing.toml")


def test_patch_deep_merges_and_validates() -> None:
    config = parse_sim_config({"models": {"*": {"latency_ms": [1, 2]}, "a": {"agreement": 0.3}}})
    patched = merge_sim_config(config, {"batch": {"expire": True}, "models": {"a": {"error_rate": 1.0}}})
    assert patched.batch.expire is True
    assert patched.batch.validating_seconds == 1.0
    a = patched.model_settings("a")
    assert (a.agreement, a.error_rate, a.latency_ms) == (0.3, 1.0, (1.0, 2.0))
    removed = merge_sim_config(patched, {"models": {"a": None}})
    assert "a" not in removed.models
    assert removed.model_settings("a").agreement == 0.95
    with pytest.raises(SimConfigError, match=r"models\.a\.agreement"):
        merge_sim_config(config, {"models": {"a": {"agreement": "high"}}})
    with pytest.raises(SimConfigError, match="JSON object"):
        merge_sim_config(config, ["not", "an", "object"])
    with pytest.raises(SimConfigError, match="nope"):
        merge_sim_config(config, {"nope": 1})


def test_merged_table_is_validated_as_a_whole() -> None:
    # each table alone is valid; their merge must be too
    config = parse_sim_config({"models": {"*": {"slow_rate": 0.5}, "m": {"slow_ms": 10}}})
    assert config.model_settings("m").slow_rate == 0.5
    assert config.model_settings("m").slow_ms == 10
