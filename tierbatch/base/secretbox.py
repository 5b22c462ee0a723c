"""Secrets kept encrypted at rest (the tenants' and schedules' webhook signing secrets).

The key comes from `TIERBATCH_SECRET_KEY` (tierbatch/base/settings.py): a Fernet key, i.e. 32 random bytes in
URL-safe base64 (44 characters), as printed by
`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`.
Several keys may be given, comma-separated, to rotate: the first one encrypts, every one decrypts
(so a new key goes first, and the old one stays after it until every secret was rotated).

Fernet is AES-128-CBC with HMAC-SHA256 (encrypt-then-MAC): a stored value that was changed or made
with another key does not decrypt, it is never silently misread.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from tierbatch.base.errors import ConfigError, TierbatchError

ENV_NAME = "TIERBATCH_SECRET_KEY"


class SecretUnreadable(TierbatchError):
    """A stored secret does not decrypt with the configured key(s)."""


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


class SecretBox:
    """Encrypts and decrypts short text secrets with the configured key(s)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ConfigError(f"{ENV_NAME}: no key given")
        fernets = []
        for index, key in enumerate(keys):
            try:
                fernets.append(Fernet(key.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                where = f"{ENV_NAME}" if len(keys) == 1 else f"{ENV_NAME} (key {index + 1})"
                raise ConfigError(f"{where}: not a valid key: it must be 32 random bytes in URL-safe base64 "
                                  "(44 characters), e.g. from `tierbatch secret-key`") from None
        self._fernet = MultiFernet(fernets)

    @classmethod
    def parse(cls, value: str) -> SecretBox | None:
        """The box for an environment value; None when it is empty (no key configured)."""
        keys = [part.strip() for part in value.split(",") if part.strip()]
        return cls(keys) if keys else None

    def seal(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SecretUnreadable(f"a stored secret does not decrypt with {ENV_NAME} "
                                   "(another key, or a changed value)") from None
