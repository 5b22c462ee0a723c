"""Simulator settings: its TOML file and the JSON body of `POST /_sim/config`.

A model's effective settings are the `[models."*"]` table merged with the model's own table
(`SimConfig.model_settings`); the per-family tables (`agreement_by_family`, `output_tokens_by_family`)
are merged key by key, so a model's own table can change one family and keep the others. Tables keep
only the keys that were written, so merging and dumping round-trip:
`SimConfig.model_validate(config.model_dump())` is the same config.

A request's task family is what its prompt says it is: a `Task family: NAME` line in a system (or
developer) message (`answers.task_family`). A provider sees nothing else of the caller's intent, so the
family is read from the prompt, never from metadata.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

DEFAULT_MODEL_KEY = "*"
LineErrorKind = Literal["http_500", "http_400", "non_http"]
# 529 is Anthropic's overloaded_error; the chat side answers it as OpenAI's overloaded 503 (and the
# Anthropic side a 503 as a 529): each side gives the status its provider gives
ErrorStatus = Literal[400, 408, 409, 429, 500, 502, 503, 504, 529]
Share = Annotated[float, Field(ge=0.0, le=1.0)]
# per-family tables merged key by key over the "*" table's
_FAMILY_TABLES = ("agreement_by_family", "output_tokens_by_family")


def _all_line_error_kinds() -> list[LineErrorKind]:
    return ["http_500", "http_400", "non_http"]


class SimConfigError(ValueError):
    """A configuration file or a `/_sim/config` body that is not valid."""


class ModelSettings(BaseModel):
    """Behaviour of one model name. Unset keys fall back to `[models."*"]`, then to these defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: tuple[float, float] = (20.0, 80.0)
    agreement: float = Field(default=0.95, ge=0.0, le=1.0)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    error_status: ErrorStatus = 500
    retry_after_seconds: float = Field(default=1.0, ge=0.0)
    slow_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    slow_ms: float = Field(default=30_000.0, ge=0.0)
    reference: bool = False
    served_as: str | None = None
    reasoning_tokens: int = Field(default=0, ge=0)
    # per task family: the share of answers equal to the reference model's (else `agreement`)
    agreement_by_family: dict[str, Share] = Field(default_factory=dict)
    # per task family: [lo, hi] tokens of a free-text answer, drawn log-uniformly per request (else the
    # few sentences of `answers.deterministic_text`); `max_tokens` still cuts it
    output_tokens_by_family: dict[str, tuple[int, int]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _latency_range(self) -> ModelSettings:
        lo, hi = self.latency_ms
        if lo < 0 or hi < lo:
            raise ValueError(f"latency_ms must be [lo, hi] with 0 <= lo <= hi, got [{lo}, {hi}]")
        for family, (shortest, longest) in self.output_tokens_by_family.items():
            if shortest < 1 or longest < shortest:
                raise ValueError(f"output_tokens_by_family.{family} must be [lo, hi] with 1 <= lo <= hi, "
                                 f"got [{shortest}, {longest}]")
        return self

    def agreement_for(self, family: str | None) -> float:
        """The agreement rate of an answer to a request of `family` (None: no family in the prompt)."""
        if family is not None:
            rate = self.agreement_by_family.get(family)
            if rate is not None:
                return rate
        return self.agreement


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    validating_seconds: float = Field(default=1.0, ge=0.0)
    in_progress_seconds: float = Field(default=5.0, ge=0.0)
    finalizing_seconds: float = Field(default=1.0, ge=0.0)
    cancelling_seconds: float = Field(default=0.5, ge=0.0)
    line_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    line_error_kinds: list[LineErrorKind] = Field(default_factory=_all_line_error_kinds, min_length=1)
    expire: bool = False
    expire_completed_share: float = Field(default=0.5, ge=0.0, le=1.0)
    enqueued_token_limit: int = Field(default=0, ge=0)
    max_lines: int = Field(default=50_000, ge=1)
    max_bytes: int = Field(default=200_000_000, ge=1)


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str = ""
    batch: BatchSettings = Field(default_factory=BatchSettings)
    # remember, per answer id, whether it was the reference answer (`GET /_sim/verdicts`); off by
    # default: the memory grows with every answer
    record_verdicts: bool = False
    # prompt prefixes remembered (oldest forgotten first): a run that must get the same cached tokens
    # whatever the order of its requests sets it above what it will ever store
    prompt_cache_entries: int = Field(default=200_000, ge=1)
    models: dict[str, ModelSettings] = Field(default_factory=lambda: {DEFAULT_MODEL_KEY: ModelSettings()})

    @field_serializer("models")
    def _dump_models(self, models: dict[str, ModelSettings]) -> dict[str, dict[str, Any]]:
        return {name: table.model_dump(mode="json", exclude_unset=True) for name, table in models.items()}

    @model_validator(mode="after")
    def _merged_tables_valid(self) -> SimConfig:
        for name in self.models:
            self.model_settings(name)  # raises on an invalid merge
        return self

    def model_settings(self, model: str) -> ModelSettings:
        """Effective settings of `model`: the "*" table merged with the model's own table."""
        merged: dict[str, Any] = {}
        default = self.models.get(DEFAULT_MODEL_KEY)
        if default is not None:
            merged.update(default.model_dump(exclude_unset=True))
        own = self.models.get(model)
        if own is not None and model != DEFAULT_MODEL_KEY:
            for key, value in own.model_dump(exclude_unset=True).items():
                merged[key] = {**merged.get(key, {}), **value} if key in _FAMILY_TABLES else value
        return ModelSettings.model_validate(merged)

    def named_models(self) -> list[str]:
        return [name for name in self.models if name != DEFAULT_MODEL_KEY]


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_sim_config(data: Any, source: str = "simulator config") -> SimConfig:
    if not isinstance(data, dict):
        raise SimConfigError(f"{source}: expected a table/object, got {type(data).__name__}")
    try:
        return SimConfig.model_validate(data)
    except ValidationError as exc:
        raise SimConfigError(f"{source}: {_format_errors(exc)}") from None


def load_sim_config(path: Path | None) -> SimConfig:
    """Read the simulator's TOML file; `None` gives the defaults."""
    if path is None:
        return SimConfig()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SimConfigError(f"cannot read simulator config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SimConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_sim_config(data, source=str(path))


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge of `patch` into a copy of `base`; a `null` in the patch removes the key."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_sim_config(config: SimConfig, patch: Any) -> SimConfig:
    """The running config with `patch` (a `/_sim/config` body) deep-merged into it, validated."""
    if not isinstance(patch, dict):
        raise SimConfigError("config patch: expected a JSON object")
    return parse_sim_config(deep_merge(config.model_dump(mode="json"), patch), source="config patch")
