"""The project's exception tree. Foreign errors (openai, psycopg) are mapped to these at one boundary."""

from __future__ import annotations


class TierbatchError(Exception):
    """Base of every error tierbatch raises on purpose."""


class ConfigError(TierbatchError):
    """Missing or invalid configuration; the process stops with this message."""


class InvalidInput(TierbatchError):
    """A user's input is wrong; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code


class NotFound(TierbatchError):
    pass


class Conflict(TierbatchError):
    pass


class TransitionError(TierbatchError):
    """A guarded state change moved no row: the object was not in an allowed state."""


class ServiceUnavailable(TierbatchError):
    """A dependency (the database, the broker) cannot be reached: worth trying again shortly (503)."""

    def __init__(self, dependency: str, retry_after_seconds: int = 2) -> None:
        super().__init__(f"the {dependency} is unreachable at the moment; try again in a few seconds")
        self.dependency = dependency
        self.retry_after_seconds = retry_after_seconds


class ProviderError(TierbatchError):
    """An error answered by (or on the way to) an LLM provider."""

    def __init__(self, message: str, *, status_code: int | None = None, provider: str = "",
                 model: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.provider = provider
        self.model = model


class RetryableProviderError(ProviderError):
    """Rate limits, timeouts, conflicts and server errors: worth trying again later."""

    def __init__(self, message: str, *, status_code: int | None = None, provider: str = "",
                 model: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, status_code=status_code, provider=provider, model=model)
        self.retry_after = retry_after


class PermanentProviderError(ProviderError):
    """A 4xx other than 408/409/429: the same request will fail the same way."""


class Unauthenticated(TierbatchError):
    """No valid credential: a missing, unknown or revoked API key (401)."""


class RateLimited(TierbatchError):
    """A limit is reached (429): `retry_after` seconds until a retry may pass; `kind` names what was counted
    (`requests`, `tokens`, `failed_authentications`)."""

    def __init__(self, message: str, retry_after: int, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.kind = kind
