"""The broker transport every tierbatch process uses (tierbatch/base/broker.py) against a real redis-server of
the test's own, killed while a consumer holds an unacknowledged message: the two cases in which kombu's own
transport leaves a Celery worker up but never consuming again."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer, Queue
from kombu.common import ignore_errors

from tests.support.private_redis import PrivateRedis
from tierbatch.base.broker import REPAIRED_TRANSPORT, Transport, install_repaired_transport

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def publish(connection: Connection, queue_name: str, count: int = 1) -> None:
    queue = Queue(queue_name, Exchange(queue_name, type="direct"), routing_key=queue_name)
    producer = Producer(connection.default_channel)
    for n in range(count):
        producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue_name, declare=[queue])


def test_the_repaired_transport_is_the_one_of_redis_and_rediss_urls() -> None:
    install_repaired_transport()
    plain = Connection("redis://:secret@127.0.0.1:6379/0")
    assert type(plain.transport) is Transport and not plain.ssl
    assert plain.as_uri() == "redis://:**@127.0.0.1:6379/0"
    # the scheme still turns TLS on, as kombu does for its own transport
    tls = Connection("rediss://127.0.0.1:6380/0?ssl_cert_reqs=required")
    assert type(tls.transport) is Transport and tls.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_acknowledgements_that_fail_while_redis_is_down_free_the_prefetch_slots(redis_server: PrivateRedis) -> None:
    with Connection(redis_server.url, transport=REPAIRED_TRANSPORT) as connection:
        publish(connection, "tasks", 2)
        channel = connection.default_channel
        channel.basic_qos(prefetch_count=2)
        held = [channel.basic_get("tasks", no_ack=False) for _ in range(2)]
        assert not channel.qos.can_consume()

        redis_server.kill()
        for message in held:
            with pytest.raises(connection.connection_errors):
                message.ack()
        # a consumer that can take messages again polls its connection, and so finds the broker gone
        assert channel.qos.can_consume()


def test_closing_after_a_broker_loss_with_unacknowledged_messages_raises_only_connection_errors(
        redis_server: PrivateRedis) -> None:
    """Celery's sequence after a broker loss: collect the connection, then close it, ignoring connection errors.
    kombu's own transport raises AttributeError ('NoneType' object has no attribute 'hostname') in the close."""
    connection = Connection(redis_server.url, transport=REPAIRED_TRANSPORT)
    publish(connection, "tasks")
    tasks = connection.default_channel
    held = tasks.basic_get("tasks", no_ack=False)  # unacknowledged, as a late-acknowledged task is
    assert held is not None
    tasks.basic_consume("tasks", False, lambda message: None, "tasks")
    control = connection.channel()  # a second channel, as the worker's mailbox had
    control.basic_consume("control", False, lambda message: None, "control")
    with pytest.raises(socket.timeout):
        connection.drain_events(timeout=0.3)  # both queues empty: each channel's BRPOP is sent, its answer pending
    assert tasks._in_poll and control._in_poll

    redis_server.kill()
    ignore_errors(connection, lambda: connection.collect(socket_timeout=1))
    ignore_errors(connection, connection.close)
    assert tasks.closed
