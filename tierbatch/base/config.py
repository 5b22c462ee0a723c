"""The TOML configuration file, validated at start with one clear message per mistake."""

from __future__ import annotations

import os
import re
import tomllib
import uuid
from collections.abc import Mapping
from decimal import Decimal
from ipaddress import ip_network
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tierbatch.base.errors import ConfigError
from tierbatch.base.states import RequestedTier, Tier

DEFAULT_SIMULATOR_URL = "http://127.0.0.1:8100/v1"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ProviderKind = Literal["openai", "anthropic"]


class ProviderConfig(_Section):
    # the wire protocol: "openai" for OpenAI and every OpenAI-compatible server (Groq, Together,
    # DeepInfra, vLLM, Ollama, llama.cpp), "anthropic" for Anthropic's Messages and Message Batches
    kind: ProviderKind = "openai"
    # as the provider's own SDK takes it: OpenAI-compatible servers end in /v1, Anthropic's does not
    base_url: str
    api_key_env: str | None = None
    batch: bool = True
    prices_from: str | None = None
    timeout_seconds: PositiveFloat = 60.0
    # send OpenAI's `prompt_cache_key` (per task type and tenant) with chat calls and batch lines;
    # turn off for an OpenAI-compatible endpoint that refuses unknown request fields
    prompt_cache_key: bool = True
    # the provider's documented Batch API discount (0.5: half price), applied to batch lines of a model
    # whose price table entry has no batch price of its own; the ledger row says it was applied
    batch_discount: Decimal | None = Field(default=None, ge=0, lt=1)
    # at most this many calls in flight to this provider from the background lane (non-urgent light
    # work on a provider with `batch = false`), so a big job cannot flood a self-hosted server; unset:
    # 4 (tierbatch.routing.tiers.DEFAULT_LANE_CONCURRENCY)
    max_concurrency: PositiveInt | None = None
    # `max_tokens` sent when a request names none (Anthropic's Messages API requires it)
    default_max_tokens: PositiveInt = 4096


class ModelRef(_Section):
    provider: str
    model: str


class TierConfig(_Section):
    provider: str
    model: str
    fallbacks: list[ModelRef] = Field(default_factory=list)

    @property
    def chain(self) -> list[ModelRef]:
        """The primary model followed by its fallbacks, in the order they are tried. (The primary's reference
        is built without validating again what this section's own validation checked: this runs on every
        gateway call.)"""
        return [ModelRef.model_construct(provider=self.provider, model=self.model), *self.fallbacks]


class BatchConfig(_Section):
    max_requests: int = Field(default=50_000, ge=1, le=50_000)
    max_bytes: int = Field(default=190_000_000, ge=1024, le=200_000_000)
    max_wait_seconds: float = Field(default=300.0, ge=0)
    poll_interval_seconds: PositiveFloat = 30.0
    expected_turnaround_seconds: float = Field(default=86_400.0, ge=0)
    max_attempts: PositiveInt = 3
    # how often beat looks for groups to flush and deadlines to escalate
    assemble_interval_seconds: PositiveFloat = 5.0
    # an in-batch task whose deadline is this close is called immediately instead of waiting
    escalate_before_deadline_seconds: float = Field(default=300.0, ge=0)
    # pause before resubmitting the halves of a batch the provider refused as a whole
    failed_batch_retry_seconds: float = Field(default=60.0, ge=0)
    # output lines written per transaction while ingesting (bounded memory, bulk writes)
    ingest_chunk_lines: int = Field(default=10_000, ge=100, le=100_000)
    # chunks written at once while ingesting, each on its own connection (its own Postgres backend)
    ingest_writers: int = Field(default=2, ge=1, le=4)


class QualityConfig(_Section):
    shadow_rate: float = Field(default=0.05, ge=0, le=1)
    min_samples: PositiveInt = 50
    window: PositiveInt = 200
    promote_below: float = Field(default=0.90, ge=0, le=1)
    demote_above: float = Field(default=0.95, ge=0, le=1)
    probe_rate: float = Field(default=0.02, ge=0, le=1)
    # free-text answers agree when rapidfuzz's ratio (0-100) / 100 is at least this
    similarity_threshold: float = Field(default=0.85, ge=0, le=1)


class CacheConfig(_Section):
    """The response cache (tierbatch/cache/responses.py)."""

    enabled: bool = True
    ttl_seconds: PositiveInt = 86_400
    # per task type: "deterministic" (the default: temperature 0, or a seed without temperature),
    # "always" (any request of the type), or "off"
    task_types: dict[str, Literal["deterministic", "always", "off"]] = Field(default_factory=dict)
    # how long the first of identical requests may take to answer before another caller takes over
    claim_seconds: PositiveFloat = 120.0
    # how often a caller waiting for an identical request in flight looks for its answer
    wait_poll_seconds: PositiveFloat = 0.05


class PriceOverride(_Section):
    """USD per million tokens, for custom and self-hosted models."""

    input: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)  # writes to the prompt cache; else `input`
    output: Decimal = Field(ge=0)
    batch_discount: Decimal = Field(default=Decimal("0"), ge=0, le=1)


class ImmediateConfig(_Section):
    max_attempts: PositiveInt = 3
    retries_per_model: int = Field(default=2, ge=0, le=10)
    backoff_base_seconds: float = Field(default=0.5, ge=0)
    backoff_max_seconds: float = Field(default=30.0, ge=0)
    lease_seconds: float = Field(default=60.0, ge=1)


class DatabaseConfig(_Section):
    """How the processes talk to Postgres. `pgbouncer = true`: DATABASE_URL is a PgBouncer in transaction
    pooling mode, where a server connection is a client's only for one transaction. Statements are then
    never prepared on the server (another client's transaction may run on that connection next), and the
    gateway's asynchronous commit is set per transaction instead of per session. Session pooling, or a
    direct connection, needs nothing (false)."""

    pgbouncer: bool = False


class ReconcilerConfig(_Section):
    interval_seconds: PositiveFloat = 15.0
    queued_stale_seconds: PositiveFloat = 60.0
    # while the queues of queued tasks hold messages, a task dispatched since they were last seen empty
    # may still have its message there: it is re-sent only once it has waited this long
    queued_backlog_seconds: PositiveFloat = 600.0
    # a batch left in `preparing` or `ingesting` this long without progress is resumed
    batch_stale_seconds: PositiveFloat = 120.0


class LimitsConfig(_Section):
    max_prompt_bytes: PositiveInt = 1_048_576
    max_tasks_per_request: PositiveInt = 1000
    # failed authentications (bad key or admin token) per client address and minute, across API processes
    failed_auth_per_minute: PositiveInt = 20
    # addresses never limited for failures: loopback is the host itself or a reverse proxy in front of the
    # API, whose address every client shares (limiting it would lock everyone out together)
    failed_auth_exempt_networks: list[IPvAnyNetwork] = Field(
        default_factory=lambda: [ip_network("127.0.0.0/8"), ip_network("::1/128")])


class BudgetConfig(_Section):
    """What happens once a tenant's month-to-date spend reaches its monthly budget."""

    # reject: new tasks are answered 402; downgrade: complex tasks are stored (and served) as light
    policy: Literal["reject", "downgrade"] = "reject"


class FilesConfig(_Section):
    """Where tenants' file sources and sinks live: each tenant reads and writes only `<root>/<tenant id>/`.
    Without a root, file paths in schedules are refused (uploaded files still work)."""

    root: Path | None = None

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_absolute():
            raise ValueError(f"must be an absolute directory, not {str(value)!r}")
        if "\x00" in str(value):
            raise ValueError("must not contain NUL characters")
        return value


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class SqlSourceConfig(_Section):
    """A database the operator lets some tenants query from schedules (`{"type": "sql", "source": NAME}`)."""

    # the name of the environment variable (of the worker) holding the database URL; never the URL itself
    url_env: str
    # tenant ids or names allowed to use it; empty: nobody
    tenants: list[str] = Field(default_factory=list)
    statement_timeout_seconds: PositiveFloat = 30.0
    # more rows than this and the run fails (the cursor does not move); None: no cap
    max_rows: PositiveInt | None = None

    @field_validator("url_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError("must be the name of an environment variable (letters, digits and _), "
                             "e.g. TICKETS_DB_URL")
        if value.upper() in ("DATABASE_URL", "REDIS_URL") or value.upper().startswith("TIERBATCH_"):
            raise ValueError(f"{value} is one of tierbatch's own settings, not a source database")
        return value

    def allows(self, tenant_id: uuid.UUID | str, tenant_name: str | None) -> bool:
        return str(tenant_id) in self.tenants or (tenant_name is not None and tenant_name in self.tenants)
class WebhooksConfig(_Section):
    """Outbound webhooks (tierbatch/webhooks/delivery.py): where they may go and how long an attempt may take."""

    # false: only public addresses (no loopback, private, link-local, ...); true for internal receivers
    allow_private_networks: bool = False
    # one attempt, from resolving the host to the last byte of the answer (an overall deadline)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # the receiver's answer is read up to this many bytes, then dropped (only its status is kept)
    max_response_bytes: int = Field(default=65_536, ge=0, le=1_048_576)


class MetricsConfig(_Section):
    """The Prometheus endpoint (`GET /metrics`, tierbatch/metrics/): open, with spend per tenant only for the
    admin token (without it the `tenant` label is summed away); `require_admin = true` closes it to all but
    the admin token."""

    require_admin: bool = False
    # the scrape-time database gauges: each statement gives up after this long, so a slow database does
    # not hang the scrape (the other series are still served)
    scrape_timeout_seconds: float = Field(default=2.0, gt=0, le=30)


class RetentionConfig(_Section):
    """How long the bodies of finished tasks are kept (tierbatch/tasks/retention.py): prompts, outputs and
    provider answers of tasks finished more than `bodies_days` ago are removed by a beat tick, in batches of
    `batch_size` rows, one transaction each; the task rows and their ledger rows stay. No `bodies_days`:
    kept forever (the default).

    How long tasks are kept at all (tierbatch/tasks/partitions.py): a month of tasks (by the time in their
    ids, when they were accepted) is dropped whole once the month ended more than `tasks_days` ago and
    none of its tasks is live; their ledger rows stay. No `tasks_days`: kept forever (the default)."""

    bodies_days: int | None = Field(default=None, ge=1, le=36_500)
    tasks_days: int | None = Field(default=None, ge=1, le=36_500)
    batch_size: int = Field(default=5_000, ge=1, le=50_000)
    interval_seconds: float = Field(default=3_600.0, gt=0, le=86_400)
    # one tick stops starting new batches after this long; the next tick goes on
    tick_budget_seconds: float = Field(default=60.0, gt=0, le=3_600)


class AppConfig(_Section):
    providers: dict[str, ProviderConfig]
    tiers: dict[Literal["light", "complex"], TierConfig]
    routing: dict[str, RequestedTier] = Field(default_factory=dict)
    batch: BatchConfig = BatchConfig()
    quality: QualityConfig = QualityConfig()
    cache: CacheConfig = CacheConfig()
    prices: dict[str, PriceOverride] = Field(default_factory=dict)
    immediate: ImmediateConfig = ImmediateConfig()
    reconciler: ReconcilerConfig = ReconcilerConfig()
    limits: LimitsConfig = LimitsConfig()
    budget: BudgetConfig = BudgetConfig()
    files: FilesConfig = FilesConfig()
    sources: dict[str, SqlSourceConfig] = Field(default_factory=dict)
    webhooks: WebhooksConfig = WebhooksConfig()
    metrics: MetricsConfig = MetricsConfig()
    retention: RetentionConfig = RetentionConfig()
    database: DatabaseConfig = DatabaseConfig()

    @model_validator(mode="after")
    def _check_references(self) -> AppConfig:
        for key in ("bodies_days", "tasks_days"):
            days = getattr(self.retention, key)
            if days is not None and self.cache.enabled and self.cache.ttl_seconds > days * 86_400:
                # a cached answer holds an output: it must not outlive the bodies or the task it was copied from
                raise ValueError(f"cache.ttl_seconds: {self.cache.ttl_seconds} keeps cached answers longer than "
                                 f"retention.{key} ({days} days = {days * 86_400} seconds)")
        for name in ("light", "complex"):
            if name not in self.tiers:
                raise ValueError(f"[tiers.{name}] is missing")
        keys = {p.api_key_env for p in self.providers.values() if p.api_key_env}
        for source_name, source in self.sources.items():
            if source.url_env in keys:
                raise ValueError(f"sources.{source_name}.url_env: {source.url_env} holds a provider key")
        for tier_name, tier in self.tiers.items():
            for index, ref in enumerate(tier.chain):
                if ref.provider not in self.providers:
                    where = f"tiers.{tier_name}" + ("" if index == 0 else f".fallbacks[{index - 1}]")
                    known = ", ".join(sorted(self.providers)) or "none"
                    raise ValueError(f"{where}: unknown provider {ref.provider!r} (configured: {known})")
        return self

    def tier(self, tier: Tier) -> TierConfig:
        return self.tiers[tier.value]  # type: ignore[index]

    def provider(self, name: str) -> ProviderConfig:
        return self.providers[name]

    def api_key(self, provider_name: str) -> str:
        """The provider's key from its environment variable; providers without one get a placeholder."""
        env_name = self.providers[provider_name].api_key_env
        return os.environ.get(env_name, "") if env_name else "unused"

    def configured_models(self) -> list[ModelRef]:
        seen: dict[tuple[str, str], ModelRef] = {}
        for tier in self.tiers.values():
            for ref in tier.chain:
                seen.setdefault((ref.provider, ref.model), ref)
        return list(seen.values())


def default_config_data(simulator_url: str = DEFAULT_SIMULATOR_URL) -> dict[str, Any]:
    """The embedded default: everything served by the local simulator."""
    return {
        "providers": {"sim": {"base_url": simulator_url, "batch": True, "prices_from": "openai"}},
        "tiers": {
            "light": {"provider": "sim", "model": "gpt-4o-mini",
                      "fallbacks": [{"provider": "sim", "model": "gpt-4.1-mini"}]},
            "complex": {"provider": "sim", "model": "gpt-4o",
                        "fallbacks": [{"provider": "sim", "model": "gpt-4.1"}]},
        },
        "routing": {"classification": "light", "extraction": "light", "summarization": "light",
                    "reasoning": "complex"},
    }


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any], source: str = "config", environ: Mapping[str, str] | None = None
                 ) -> AppConfig:
    try:
        config = AppConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    env = os.environ if environ is None else environ
    for name, provider in config.providers.items():
        if provider.api_key_env and not env.get(provider.api_key_env):
            raise ConfigError(
                f"{source}: providers.{name}.api_key_env: environment variable "
                f"{provider.api_key_env} is not set"
            )
    return config


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read and validate the config file; without a path, the embedded simulator default."""
    if path is None:
        return parse_config(default_config_data(), "embedded default config", environ)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"TIERBATCH_CONFIG={path}: cannot read the file ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path), environ)
