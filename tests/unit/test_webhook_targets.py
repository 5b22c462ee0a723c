"""Where a webhook may go, without services: the address checks, DNS rebinding through an injected
resolver, the connection pinned to the checked address, the byte cap and the overall deadline, and the
secret box. The network is a seam here (resolver, httpx.MockTransport) or a server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tierbatch.api.errors import status_of
from tierbatch.base.config import WebhooksConfig
from tierbatch.base.errors import ConfigError, InvalidInput
from tierbatch.base.secretbox import SecretBox, SecretUnreadable, generate_key
from tierbatch.base.settings import Settings
from tierbatch.webhooks.delivery import WebhookCall, deliver
from tierbatch.webhooks.signing import new_secret
from tierbatch.webhooks.targets import BlockedTarget, TargetPolicy

PUBLIC = "93.184.216.34"

REFUSED_URLS = [
    "http://127.0.0.1/h", "http://127.0.0.2:8080/h", "http://localhost/h", "http://LOCALHOST./h",
    "http://api.localhost/h", "http://[::1]/h", "http://2130706433/h", "http://127.1/h", "http://0x7f.1/h",
    "http://0177.0.0.1/h", "http://10.0.0.1/h", "http://172.16.5.4/h", "http://192.168.1.1/h",
    "http://169.254.169.254/latest/meta-data", "http://[::ffff:127.0.0.1]/h", "http://[::ffff:7f00:1]/h",
    "http://[::ffff:169.254.169.254]/h", "http://0.0.0.0/h", "http://0/h", "http://[::]/h",
    "http://[fc00::1]/h", "http://[fd12:3456::1]/h", "http://[fe80::1]/h", "http://224.0.0.1/h",
    "http://255.255.255.255/h", "http://100.64.0.1/h", "http://240.0.0.1/h", "http://[2002:7f00:1::]/h",
    "http://[64:ff9b::7f00:1]/h", "http://[ff02::1]/h", "http://198.18.0.1/h",
]


def fixed(*addresses: str) -> TargetPolicy:
    return TargetPolicy(resolver=lambda host, port: list(addresses))


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_non_public_addresses_are_a_422_naming_webhook_url(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        fixed(PUBLIC).check_url(url)  # the resolver is never asked for literals and localhost names
    assert status_of(caught.value) == 422 and caught.value.param == "webhook_url"
    assert caught.value.message.startswith("webhook_url:")


@pytest.mark.parametrize("resolved", [["127.0.0.1"], ["10.1.2.3"], ["::1"], [PUBLIC, "192.168.0.7"],
                                      ["fe80::1%eth0"], ["::ffff:10.0.0.1"], []])
def test_a_name_that_resolves_to_any_non_public_address_is_refused_without_naming_it(resolved: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        fixed(*resolved).check_url("https://hooks.example.com/in")
    assert caught.value.param == "webhook_url"
    for address in resolved:  # what internal DNS answers is not shown to the tenant
        assert address.split("%")[0] not in caught.value.message


def test_a_name_that_does_not_resolve_is_refused() -> None:
    def fails(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "unknown")

    with pytest.raises(InvalidInput) as caught:
        TargetPolicy(resolver=fails).check_url("https://nowhere.example/h")
    assert caught.value.param == "webhook_url" and "does not resolve" in caught.value.message


def test_public_addresses_pass_and_operators_may_allow_private_networks() -> None:
    assert fixed(PUBLIC, "2606:2800:220:1:248:1893:25c8:1946").check_url("https://hooks.example.com/h")
    assert fixed().check_url("https://8.8.8.8/h") == "https://8.8.8.8/h"
    internal = TargetPolicy(allow_private_networks=True, resolver=lambda host, port: ["10.0.0.5"])
    for url in ("http://127.0.0.1:9/h", "http://localhost/h", "http://hooks.internal/h", "http://[::1]/h"):
        assert internal.check_url(url) == url
    for url in ("http://0.0.0.0/h", "http://224.0.0.1/h"):  # never a receiver, allowed or not
        with pytest.raises(InvalidInput):
            internal.check_url(url)


# --- at connect time ------------------------------------------------------------------------------------

def recording(sent: list[httpx.Request], status: int) -> httpx.MockTransport:
    """A transport instead of the network: it keeps every request that reached it."""
    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status)

    return httpx.MockTransport(handle)


def call(url: str, secret: str | None = None) -> WebhookCall:
    return WebhookCall("job", uuid.uuid4(), 1, url, b'{"event":"job.finished"}', secret or new_secret(),
                       "job.finished")


def test_dns_rebinding_a_public_answer_at_creation_then_loopback_at_delivery_is_never_connected() -> None:
    answers = iter([[PUBLIC], ["127.0.0.1"]])
    policy = TargetPolicy(resolver=lambda host, port: next(answers))
    url = "http://rebind.example/hook"
    assert policy.check_url(url) == url  # creation: public
    sent: list[httpx.Request] = []
    transport = recording(sent, 200)
    result = deliver(call(url), WebhooksConfig(), resolver=policy.resolver, transport=transport)
    assert sent == []  # no request was made
    assert not result.delivered and result.status_code is None
    assert result.error is not None and result.error.startswith("not sent:") and "public" in result.error


def test_the_connection_goes_to_the_checked_address_with_the_original_host_and_sni() -> None:
    sent: list[httpx.Request] = []
    transport = recording(sent, 204)
    secret = new_secret()
    result = deliver(call("https://hooks.example.com:8443/in?x=1", secret), WebhooksConfig(),
                     resolver=lambda host, port: [PUBLIC], transport=transport)
    assert result.delivered and result.status_code == 204 and result.error is None
    [request] = sent
    assert request.url.host == PUBLIC and request.url.port == 8443 and request.url.raw_path == b"/in?x=1"
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"  # TLS name and certificate check
    assert Webhook(secret).verify(request.content, dict(request.headers)) == {"event": "job.finished"}
    assert request.headers["x-tierbatch-event"] == "job.finished"


def test_the_webhook_id_is_the_same_on_every_attempt_of_a_subject() -> None:
    sent: list[httpx.Request] = []
    transport = recording(sent, 500)
    subject = uuid.uuid4()
    for attempt in (1, 2):
        one = WebhookCall("job", subject, attempt, "https://8.8.8.8/h", b"{}", new_secret(), "job.finished")
        deliver(one, WebhooksConfig(), transport=transport)
    assert [r.headers["webhook-id"] for r in sent] == [f"msg_{subject.hex}"] * 2
    assert [r.headers["x-tierbatch-attempt"] for r in sent] == ["1", "2"]


def test_only_the_status_is_kept_and_the_answer_is_read_up_to_the_cap() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(10_000):
            pulled += 1
            yield b"SECRET-" + b"x" * 1017  # 1 KiB a chunk, 10 MB in all

    transport = httpx.MockTransport(lambda request: httpx.Response(502, content=endless()))
    result = deliver(call("https://8.8.8.8/h"), WebhooksConfig(max_response_bytes=65_536), transport=transport)
    assert (result.status_code, result.error) == (502, "HTTP 502")
    assert pulled <= 65  # 64 KiB read, then dropped


def test_a_missing_secret_is_a_failed_attempt_and_no_request() -> None:
    sent: list[httpx.Request] = []
    transport = recording(sent, 200)
    orphan = WebhookCall("job", uuid.uuid4(), 1, "https://8.8.8.8/h", b"{}", None, "job.finished",
                         "the tenant has no webhook secret")
    result = deliver(orphan, WebhooksConfig(), transport=transport)
    assert sent == [] and not result.delivered and result.error == "not sent: the tenant has no webhook secret"


@pytest.fixture
def dripping_server() -> Iterator[int]:
    """Answers 200 with headers at once, then one byte every 0.2 s for 30 s: each read is quick, the
    whole answer is not."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65_536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 150\r\n\r\n")
                for _ in range(150):
                    if stop.wait(0.2):
                        break
                    try:
                        conn.sendall(b"x")
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_the_deadline_is_for_the_whole_attempt_not_each_read(dripping_server: int) -> None:
    started = time.monotonic()
    result = deliver(call(f"http://127.0.0.1:{dripping_server}/h"),
                     WebhooksConfig(allow_private_networks=True, timeout_seconds=1.0))
    took = time.monotonic() - started
    assert 0.9 <= took < 3.0, took
    assert not result.delivered and result.status_code is None
    assert result.error is not None and result.error.startswith("timed out")


def test_a_loopback_receiver_is_not_contacted_under_the_default_policy(dripping_server: int) -> None:
    result = deliver(call(f"http://127.0.0.1:{dripping_server}/h"), WebhooksConfig())
    assert result.error is not None and result.error.startswith("not sent:") and result.duration_ms < 1000


# --- secrets at rest ------------------------------------------------------------------------------------

def test_the_secret_box_seals_opens_and_rotates_keys() -> None:
    old, new = generate_key(), generate_key()
    secret = new_secret()
    sealed = SecretBox([old]).seal(secret)
    assert secret not in sealed and secret.removeprefix("whsec_") not in sealed
    rotated = SecretBox.parse(f"{new},{old}")
    assert rotated is not None and rotated.open(sealed) == secret  # the old key still opens
    with pytest.raises(SecretUnreadable):
        SecretBox([new]).open(sealed)
    assert SecretBox.parse("") is None and SecretBox.parse(" , ") is None


@pytest.mark.parametrize("bad", ["short", "x" * 44, generate_key()[:-2], "é" * 44])
def test_a_malformed_key_stops_the_process_at_start(bad: str) -> None:
    with pytest.raises(ConfigError):
        SecretBox.parse(bad)
    with pytest.raises(ValueError, match="TIERBATCH_SECRET_KEY"):
        Settings(TIERBATCH_SECRET_KEY=bad)  # type: ignore[call-arg]
    assert Settings(TIERBATCH_SECRET_KEY=generate_key()).secret_box() is not None  # type: ignore[call-arg]


def test_new_secrets_are_standard_webhooks_secrets() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 44
    at = datetime.now(UTC)
    assert Webhook(secret).sign("msg_1", at, "{}").startswith("v1,")
    assert new_secret() != secret


def test_blocked_target_is_raised_for_literals_before_any_lookup() -> None:
    asked: list[str] = []
    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return [PUBLIC]

    policy = TargetPolicy(resolver=resolver)
    with pytest.raises(BlockedTarget):
        policy.addresses("127.1", 80)
    with pytest.raises(BlockedTarget):
        policy.addresses("localhost", 80)
    assert asked == []
    assert asyncio.run(asyncio.to_thread(policy.addresses, "hooks.example.com", 443))


def test_international_names_are_resolved_and_sent_as_idna_and_ipv6_answers_are_pinned_too() -> None:
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["2606:2800:220:1:248:1893:25c8:1946"]

    sent: list[httpx.Request] = []
    result = deliver(call("https://bücher.example/h"), WebhooksConfig(), resolver=resolver,
                     transport=recording(sent, 200))
    assert result.delivered and asked == ["xn--bcher-kva.example"]
    [request] = sent
    assert request.url.host == "2606:2800:220:1:248:1893:25c8:1946"
    assert request.extensions["sni_hostname"] == "xn--bcher-kva.example"
    assert request.headers["host"] == "xn--bcher-kva.example"
