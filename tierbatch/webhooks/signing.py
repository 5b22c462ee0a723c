"""The Standard Webhooks scheme: the secret format and the signature headers.

Headers (https://www.standardwebhooks.com, the `standardwebhooks` package): `webhook-id` (one per
subject: the same on every retry, so a receiver drops repeats), `webhook-timestamp` (Unix seconds of
this attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`) under a
`whsec_<base64>` secret. A receiver verifies with `standardwebhooks.Webhook(secret).verify(body, headers)`,
which also refuses stale timestamps (replays).

Secrets are stored encrypted (tierbatch/base/secretbox.py, key `TIERBATCH_SECRET_KEY`) and decrypted when an
attempt is made (tierbatch/webhooks/delivery.py).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from datetime import datetime

from standardwebhooks.webhooks import Webhook

from tierbatch.base.errors import InvalidValue
from tierbatch.base.secretbox import ENV_NAME as SECRET_KEY_ENV
from tierbatch.base.secretbox import SecretBox

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """`whsec_` and 32 random bytes in standard base64: the Standard Webhooks secret format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def signed_headers(secret: str, message_id: str, at: datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for `body` (ValueError for a secret that cannot sign)."""
    try:
        signer = Webhook(secret)
    except (binascii.Error, ValueError, RuntimeError) as exc:  # EmptyWebhookSecretError is a RuntimeError
        raise ValueError("the webhook secret is not in the whsec_<base64> format: rotate it") from exc
    return {ID_HEADER: message_id, TIMESTAMP_HEADER: str(int(at.timestamp())),
            SIGNATURE_HEADER: signer.sign(message_id, at, body.decode("utf-8"))}


def require_secret_box(box: SecretBox | None) -> SecretBox:
    """Webhooks need a key to keep their secrets: a 422 naming the field when the server has none."""
    if box is None:
        raise InvalidValue(f"webhook_url: webhooks are not enabled on this server ({SECRET_KEY_ENV} is not set)",
                           param="webhook_url")
    return box
