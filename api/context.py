"""Resources of one API process, built by the app factory (never at import time)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tierbatch.base.config import AppConfig
from tierbatch.base.messaging import SAMPLE_GATEWAY_CALLS, make_producer
from tierbatch.base.secretbox import SecretBox
from tierbatch.base.settings import Settings
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.gateway.call import Gateway
from tierbatch.gateway.policies import TenantPolicies
from tierbatch.gateway.recorder import CallWriter, Recorder
from tierbatch.gateway.sampling import CallSampler
from tierbatch.ledger.pricing import PriceBook
from tierbatch.openai_batches.files import FileLimits
from tierbatch.providers.client import AsyncProviderClients
from tierbatch.providers.cooldown import Cooldown
from tierbatch.tenants.auth import KeyAuthenticator, RateLimits, database_lookup, limits_storage
from tierbatch.webhooks.targets import TargetPolicy

# connections each API process keeps open to Postgres (tierbatch.db.engine.MAX_OVERFLOW more under load), besides
# the gateway's call writer's one
API_POOL_SIZE = 10


@dataclass
class ApiContext:
    settings: Settings
    config: AppConfig
    engine: Engine
    sessions: sessionmaker[Session]
    producer: Celery
    # --- OpenAI-compatible front door ---
    prices: PriceBook
    providers: AsyncProviderClients
    redis: aioredis.Redis
    gateway: Gateway
    recorder: Recorder  # the gateway's call records, group-committed through `call_writer`
    call_writer: CallWriter
    sampler: CallSampler  # the recorded calls the quality monitor may shadow, sent to the workers
    keys: KeyAuthenticator  # API keys of both surfaces, the admin token, failed-authentication limits
    file_limits: FileLimits
    tenant_policies: TenantPolicies  # routing rules and budgets on the OpenAI surface
    # --- webhooks: secrets encrypted at rest (None: no key, no webhooks), where a webhook_url may go ---
    secret_box: SecretBox | None
    webhook_targets: TargetPolicy
    rate_limits: RateLimits  # per-tenant requests and tokens per minute, in Redis

    @classmethod
    def build(cls, settings: Settings, config: AppConfig) -> ApiContext:
        engine = make_engine(settings.database_url, pool_size=API_POOL_SIZE, pgbouncer=config.database.pgbouncer)
        sessions = make_session_factory(engine)
        # --- OpenAI-compatible front door ---
        prices = PriceBook(config)
        providers = AsyncProviderClients(config)
        redis_client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        # the gateway records calls over its own async connection (group commit, one statement per group)
        call_writer = CallWriter(settings.psycopg_dsn, pgbouncer=config.database.pgbouncer)
        producer = make_producer(settings)
        # recorded calls the quality monitor may shadow go to the workers about once a second
        sampler = CallSampler(config, lambda ids: producer.send_task(SAMPLE_GATEWAY_CALLS, args=[ids]))
        recorder = Recorder(call_writer.write, committed=sampler.committed)
        gateway = Gateway(config, providers, Cooldown(redis_client, settings.redis_key_prefix), prices, recorder,
                          sessions=sessions)
        gateway.warm_prices()
        # batch file limits: OpenAI's by default; settings may lower them (tests, small deployments)
        limits = FileLimits(max_bytes=settings.batch_file_max_bytes, max_lines=settings.batch_file_max_lines)
        rate_limits = RateLimits(limits_storage(redis_client, settings.redis_url, settings.redis_key_prefix))
        keys = KeyAuthenticator(database_lookup(sessions), redis_client, settings.redis_key_prefix, rate_limits,
                                config.limits.failed_auth_per_minute,
                                exempt_networks=config.limits.failed_auth_exempt_networks)
        return cls(settings, config, engine, sessions, producer, prices, providers, redis_client,
                   gateway, recorder, call_writer, sampler, keys, limits, TenantPolicies(sessions, config),
                   settings.secret_box(), TargetPolicy.from_config(config.webhooks), rate_limits)

    async def aclose(self) -> None:
        """Async resources (front door): drain pending call records, close provider and Redis clients."""
        await self.recorder.aclose()  # the records still pending are committed before the connection closes
        await self.call_writer.aclose()
        await self.sampler.aclose()
        await self.providers.aclose()
        await self.redis.aclose()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.engine.dispose()
