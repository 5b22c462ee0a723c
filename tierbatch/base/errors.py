"""The project's exception tree. Foreign errors (openai, psycopg, redis) are mapped to these at one
boundary each; nothing here knows HTTP. The API's error module (`tierbatch.api.errors`) is the one
place that turns a class into a status code and an error body; the worker turns the same classes into
the error stored on a task (`tierbatch.worker.errors`).

    TierbatchError
    ├── ConfigError                 missing or invalid configuration: the process stops with the message
    ├── Refused                     the request is refused as asked and nothing was done
    │   ├── InvalidInput            malformed, or a value out of range
    │   │   ├── InvalidValue        well-formed, but a value is not acceptable (a bad URL, an unknown tier)
    │   │   ├── TooLarge            over a size or count limit
    │   │   └── UnsupportedMediaType  a body in a format this route does not read
    │   ├── NotFound                no such object, or not the caller's
    │   │   └── ModelNotFound       the model asked for is not configured
    │   ├── Conflict                the object's present state forbids it (a duplicate name, a run in flight)
    │   │   └── TransitionError     a guarded state change moved no row
    │   └── BudgetExceeded          the tenant's monthly budget is spent and its policy is `reject`
    ├── Unauthenticated             a missing, unknown or revoked API key
    ├── RateLimited                 a limit is reached; `retry_after` seconds until a retry may pass
    ├── ServiceUnavailable          a dependency (database, broker) is unreachable: try again shortly
    │   └── RecordingFailed         an answer could not be recorded, so it is withheld
    └── ProviderError               an error answered by (or on the way to) an LLM provider
        ├── RetryableProviderError  rate limits, timeouts, conflicts and server errors
        ├── PermanentProviderError  the same request will fail the same way
        └── ChainExhausted          every model of a tier's chain failed (or was cooling down)

`Refused` carries `param` (the field at fault, as the OpenAI surface names it) and `code` (a stable
machine-readable reason, e.g. `empty_file`); neither is an HTTP notion. `ProviderError.status_code` is
the status the *upstream* answered, a fact about the provider's response that callers reason about.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Self


class TierbatchError(Exception):
    """Base of every error tierbatch raises on purpose."""


class ConfigError(TierbatchError):
    """Missing or invalid configuration; the process stops with this message."""


class Refused(TierbatchError):
    """A request refused as asked; `param` names the field at fault, `code` is a stable reason."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def reworded(self, message: str, param: str | None = None) -> Self:
        """The same refusal (same class and code) told in the caller's terms, e.g. prefixed with a line
        number; `param` None keeps this one's."""
        return type(self)(message, param if param is not None else self.param, self.code)


class InvalidInput(Refused):
    """Malformed input, or a value out of range."""


class InvalidValue(InvalidInput):
    """Well-formed input whose value is not acceptable (it parses, but means nothing we can do)."""


class TooLarge(InvalidInput):
    """Over a size or count limit."""


class UnsupportedMediaType(InvalidInput):
    """A body in a format the route does not read."""


class NotFound(Refused):
    """No such object, or one that belongs to another tenant (the two are not told apart)."""


class ModelNotFound(NotFound):
    """The model asked for is not one this deployment serves."""

    def __init__(self, model: str, param: str | None = "model") -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param,
                         "model_not_found")
        self.model = model

    def reworded(self, message: str, param: str | None = None) -> Self:
        copy = type(self)(self.model, param if param is not None else self.param)
        copy.message = message
        copy.args = (message,)
        return copy


class Conflict(Refused):
    """The object's present state forbids the request."""


class TransitionError(Conflict):
    """A guarded state change moved no row: the object was not in an allowed state."""


class BudgetExceeded(Refused):
    """The tenant's monthly budget is reached and its policy is `reject`."""


class Unauthenticated(TierbatchError):
    """No valid credential: a missing, unknown or revoked API key. `code` names which (`missing_api_key`,
    `invalid_api_key`); `challenge` says the caller may answer with a key (false for the admin token)."""

    def __init__(self, message: str = "invalid API key", code: str | None = None, *, challenge: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.challenge = challenge


class RateLimited(TierbatchError):
    """A limit is reached: `retry_after` seconds until a retry may pass; `kind` names what was counted
    (`requests`, `tokens`, `failed_authentications`)."""

    def __init__(self, message: str, retry_after: int, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.kind = kind


class ServiceUnavailable(TierbatchError):
    """A dependency (the database, the broker) cannot be reached: worth trying again shortly."""

    code = "service_unavailable"

    def __init__(self, dependency: str, retry_after_seconds: int = 2, message: str | None = None) -> None:
        self.message = message or f"the {dependency} is unreachable at the moment; try again in a few seconds"
        super().__init__(self.message)
        self.dependency = dependency
        self.retry_after_seconds = retry_after_seconds


class RecordingFailed(ServiceUnavailable):
    """A call's task and ledger rows could not be committed, so its answer is withheld: a client may
    retry (the usual cause is the database being unreachable)."""

    code = "recording_failed"

    def __init__(self, detail: str = "") -> None:
        super().__init__("database", 1, "The request could not be recorded, so its answer is withheld; "
                         "please try again.")
        self.detail = detail  # what went wrong, for the log; the client is told only to retry


class ProviderError(TierbatchError):
    """An error answered by (or on the way to) an LLM provider. `status_code` is the upstream's
    status (None when no response came back); `timed_out` says the call ran out of time."""

    def __init__(self, message: str, *, status_code: int | None = None, provider: str = "",
                 model: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.provider = provider
        self.model = model
        self.timed_out = timed_out


class RetryableProviderError(ProviderError):
    """Rate limits, timeouts, conflicts and server errors: worth trying again later."""

    def __init__(self, message: str, *, status_code: int | None = None, provider: str = "",
                 model: str = "", retry_after: float | None = None, timed_out: bool = False) -> None:
        super().__init__(message, status_code=status_code, provider=provider, model=model, timed_out=timed_out)
        self.retry_after = retry_after


class PermanentProviderError(ProviderError):
    """A 4xx other than 408/409/429: the same request will fail the same way."""


class ChainExhausted(ProviderError):
    """Every model of the chain failed, each error in `errors` (in call order). No errors at all means
    every model was cooling down: `cooling_retry_after` says for how long."""

    def __init__(self, errors: Sequence[ProviderError] = (), cooling_retry_after: float | None = None,
                 task_id: uuid.UUID | None = None) -> None:
        self.errors = list(errors)
        self.cooling_retry_after = cooling_retry_after
        self.task_id = task_id  # the failed call's task, when it was recorded
        last = self.errors[-1] if self.errors else None
        super().__init__(self._summary(), status_code=last.status_code if last else None,
                         provider=last.provider if last else "", model=last.model if last else "")

    @property
    def retryable(self) -> bool:
        return any(isinstance(error, RetryableProviderError) for error in self.errors)

    @property
    def retry_after(self) -> float | None:
        hints = [e.retry_after for e in self.errors
                 if isinstance(e, RetryableProviderError) and e.retry_after is not None]
        return max(hints) if hints else None

    def _summary(self) -> str:
        counts: dict[str, int] = {}
        for error in self.errors:
            counts[error.message] = counts.get(error.message, 0) + 1
        parts = [message if n == 1 else f"{message} (x{n})" for message, n in counts.items()]
        return "; ".join(parts) or "no model configured"
