"""Where a task falls in the quality monitor's two draws, in SQL over its stored request.

A task's draw is its request's 64-bit `jsonb_hash_extended`, scaled to [0, 1): equal JSON values hash
equally whatever their key order or spacing, so the same workload is sampled alike in every run, and a
repeated request is drawn alike. Two seeds make two independent draws: the shadow draw (a light answer
re-run on the premium model) and the probe draw (a promoted type's answer re-run on the light model).
The decisions over these points are the quality monitor's (`tierbatch.quality.monitor`); the SQL is here
so that a bulk path (ingestion) can read a chunk's candidates in the statement that reads its requests.
"""

from __future__ import annotations

from tierbatch.base.config import QualityConfig
from tierbatch.base.states import Tier

# seeds of the two draws over a request's hash: a task shadowed is not more likely to be probed
SHADOW_SEED = 0x7368
PROBE_SEED = 0x7072


def point_sql(seed: int) -> str:
    """A `tasks` row's point in [0, 1) for the draw of `seed`."""
    return f"(jsonb_hash_extended(request, {seed})::float8 / 18446744073709551616.0 + 0.5)"


# the rows that may get an extra call at the rates :shadow and :probe (`rate_params`), whatever their rule:
# a light task by its shadow draw, any other by its probe draw (one hash per row), never a shadow task
MAY_BE_SAMPLED_SQL = (f"(shadow_of IS NULL AND CASE WHEN tier = '{Tier.LIGHT.value}' "
                      f"THEN {point_sql(SHADOW_SEED)} < :shadow ELSE {point_sql(PROBE_SEED)} < :probe END)")


def sql_rate(rate: float) -> float:
    """A rate for `point < rate` in SQL: 0 takes no point, anything over 1 every point (points are < 1)."""
    return 0.0 if rate <= 0 else 2.0 if rate >= 1 else rate


def samples_any(quality: QualityConfig) -> bool:
    """Whether either draw can take a task at these rates."""
    return quality.shadow_rate > 0 or quality.probe_rate > 0


def rate_params(quality: QualityConfig) -> dict[str, float]:
    """`MAY_BE_SAMPLED_SQL`'s parameters."""
    return {"shadow": sql_rate(quality.shadow_rate), "probe": sql_rate(quality.probe_rate)}
