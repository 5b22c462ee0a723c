from __future__ import annotations

from pathlib import Path

import pytest

from tierbatch.base.config import default_config_data, load_config, parse_config
from tierbatch.base.errors import ConfigError
from tierbatch.base.states import Tier


def test_embedded_default_config_routes_everything_to_the_simulator() -> None:
    config = load_config(None, environ={})
    assert config.tier(Tier.LIGHT).chain[0].model == "gpt-4o-mini"
    assert {ref.provider for ref in config.configured_models()} == {"sim"}


def test_unknown_provider_in_a_tier_is_named() -> None:
    data = default_config_data()
    data["tiers"]["complex"]["fallbacks"] = [{"provider": "nowhere", "model": "m"}]
    with pytest.raises(ConfigError, match=r"tiers\.complex\.fallbacks\[0\]: unknown provider 'nowhere'"):
        parse_config(data, environ={})


def test_missing_key_variable_is_named() -> None:
    data = default_config_data()
    data["providers"]["sim"]["api_key_env"] = "SIM_KEY_FOR_TEST"
    with pytest.raises(ConfigError, match="environment variable SIM_KEY_FOR_TEST is not set"):
        parse_config(data, environ={})
    assert parse_config(data, environ={"SIM_KEY_FOR_TEST": "k"}).api_key("sim") == ""  # read at call time


@pytest.mark.parametrize(("section", "key", "value", "fragment"), [
    ("batch", "max_requests", "many", "batch.max_requests"),
    ("batch", "max_requests", 60_000, "batch.max_requests"),
    ("quality", "shadow_rate", 1.5, "quality.shadow_rate"),
    ("batch", "colour", 1, "batch.colour: unknown key"),
    ("database", "pgbouncer", "sometimes", "database.pgbouncer"),
    ("database", "pool_mode", "transaction", "database.pool_mode: unknown key"),
])
def test_bad_numbers_and_unknown_keys_are_named(section: str, key: str, value: object, fragment: str) -> None:
    data = default_config_data()
    data[section] = {key: value}
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        parse_config(data, environ={})


def test_pgbouncer_is_off_unless_the_database_section_turns_it_on() -> None:
    assert parse_config(default_config_data(), environ={}).database.pgbouncer is False
    assert parse_config({**default_config_data(), "database": {"pgbouncer": True}}, environ={}).database.pgbouncer


def test_missing_tier_is_named() -> None:
    data = default_config_data()
    del data["tiers"]["light"]
    with pytest.raises(ConfigError, match=r"\[tiers\.light\] is missing"):
        parse_config(data, environ={})


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[providers.sim\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_price_overrides_parse_as_decimals(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("""
[providers.local]
base_url = "http://127.0.0.1:9/v1"
[tiers.light]
provider = "local"
model = "my-local-llama"
[tiers.complex]
provider = "local"
model = "my-local-llama"
[prices."my-local-llama"]
input = 0.05
output = 0.10
""")
    config = load_config(path, environ={})
    assert str(config.prices["my-local-llama"].input) == "0.05"


def test_batch_file_limits_come_from_settings_once() -> None:
    from pydantic import ValidationError

    from tierbatch.base.settings import Settings

    lowered = Settings(TIERBATCH_BATCH_FILE_MAX_BYTES="65536", TIERBATCH_BATCH_FILE_MAX_LINES="10")  # type: ignore[call-arg]
    assert (lowered.batch_file_max_bytes, lowered.batch_file_max_lines) == (65536, 10)
    unset = Settings(TIERBATCH_BATCH_FILE_MAX_BYTES="", TIERBATCH_BATCH_FILE_MAX_LINES="")  # type: ignore[call-arg]
    assert (unset.batch_file_max_bytes, unset.batch_file_max_lines) == (200_000_000, 50_000)  # OpenAI's limits
    for bad in ("0", "-1", "many", "300000000"):
        with pytest.raises(ValidationError):
            Settings(TIERBATCH_BATCH_FILE_MAX_BYTES=bad)  # type: ignore[call-arg]
