"""The Redis transport of every tierbatch Celery app (`install_repaired_transport`, called by the app factories):
kombu's, with two repairs for a broker that goes away while a worker holds unacknowledged messages (late
acknowledgement: every task until it has run). Without them a worker can stay up without ever consuming
again after a Redis restart.

- An acknowledgement that fails because Redis is unreachable still frees the message's prefetch slot.
  kombu keeps such a message counted as delivered; once the prefetch limit is reached that way the consumer
  sends no BRPOP and polls no socket, so it never learns that the broker went away. The message's entry in
  the unacked index of a Redis that kept it is restored after the visibility timeout, as any unacknowledged
  message's is (tierbatch's tasks are idempotent; the reconciler re-sends from Postgres what a lost broker held).
- A channel whose connection was closed answers a connection error instead of AttributeError. After a broker
  loss Celery closes the consumer's connection twice; when the first close stopped early, the second restores
  the unacknowledged messages through a channel whose transport no longer has a connection. The
  AttributeError kombu raises there is not a connection error to Celery, and the consumer stops for good.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions
from kombu.transport import TRANSPORT_ALIASES, get_transport_cls, virtual
from kombu.transport import redis as kombu_redis


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)  # done here, whatever Redis answered

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            if requeue:
                self.restore_by_tag(delivery_tag, leftmost=True)
            else:
                self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection of this channel is closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


REPAIRED_TRANSPORT = f"{__name__}:Transport"
REDIS_SCHEMES = ("redis", "rediss")  # rediss: TLS, which kombu still enables by the scheme's name


def install_repaired_transport() -> None:
    """kombu's transport of `redis://` and `rediss://` URLs becomes `Transport`, for the connections this
    process makes afterwards. Raises if kombu had resolved one of them to its own class already (it keeps
    the class it resolved for a name): that process would run without the repairs."""
    for scheme in REDIS_SCHEMES:
        TRANSPORT_ALIASES[scheme] = REPAIRED_TRANSPORT
        if get_transport_cls(scheme) is not Transport:
            raise RuntimeError(f"kombu resolved the {scheme}:// transport before tierbatch's repaired one was set")
