"""The worker's side of the error tree (`tierbatch.base.errors`): what a task stores when its call
failed, and what a refused `submit_tasks` message returns as its result. The API does the same for
HTTP in `tierbatch.api.errors`; neither knows the other."""

from __future__ import annotations

from typing import Any

from tierbatch.base.errors import BudgetExceeded, ChainExhausted, ProviderError, Refused, Unauthenticated

# the `type` of a refused submission, by class (the nearest listed parent answers for a subclass)
_REJECTION_TYPES: dict[type[Exception], str] = {
    Refused: "invalid_request_error", BudgetExceeded: "budget_exceeded", Unauthenticated: "authentication_error",
}


def rejection(exc: Refused | Unauthenticated) -> dict[str, Any]:
    """The result of a `submit_tasks` message that stored nothing: `{"error": {"type", "message", "param"}}`."""
    kind = next(_REJECTION_TYPES[k] for k in type(exc).__mro__ if k in _REJECTION_TYPES)
    param = exc.param if isinstance(exc, Refused) else None
    return {"error": {"type": kind, "message": exc.message, "param": param}}


def task_error(exc: ProviderError) -> str:
    """The text kept in `tasks.error` for a call that failed: each distinct provider message once, with
    how many times it came (`ChainExhausted` already words its chain that way)."""
    return str(exc) if isinstance(exc, ChainExhausted) else exc.message
