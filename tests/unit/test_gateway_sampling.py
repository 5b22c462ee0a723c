"""Which recorded gateway calls reach the quality monitor, and how: the recorder's commit hook and
`CallSampler`, with an injected publisher standing in for the broker."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from tierbatch.base.config import AppConfig, default_config_data, parse_config
from tierbatch.base.states import Mode, RequestedTier, TaskStatus, Tier
from tierbatch.gateway.recorder import CallRecord, Recorder
from tierbatch.gateway.routing import Route
from tierbatch.gateway.sampling import MAX_IDS_PER_MESSAGE, CallSampler
from tierbatch.ledger.pricing import TokenUsage


def _config(shadow_rate: float, probe_rate: float) -> AppConfig:
    data = default_config_data()
    data["quality"] = {"shadow_rate": shadow_rate, "probe_rate": probe_rate}
    return parse_config(data)


def _record(tier: Tier = Tier.LIGHT, **changes: Any) -> CallRecord:
    now = datetime.now(UTC)
    record = CallRecord(uuid.uuid4(), uuid.uuid4(), Route(tier, RequestedTier.AUTO, "config routing", "general", []),
                        {"messages": []}, {}, TaskStatus.SUCCEEDED, 1, now, now, provider="sim",
                        requested_model="m", served_model="m", output="hi", response_json="{}",
                        usage=TokenUsage(1, 0, 1, 0), latency_ms=1)
    return dataclasses.replace(record, **changes)


class Published:
    """The messages a sampler sent, from the thread it sends on; optionally failing."""

    def __init__(self, fail: bool = False) -> None:
        self.messages: list[list[str]] = []
        self.threads: set[int] = set()
        self.fail = fail

    def __call__(self, ids: list[str]) -> None:
        self.threads.add(threading.get_ident())
        if self.fail:
            raise ConnectionError("broker down")
        self.messages.append(ids)

    @property
    def ids(self) -> list[str]:
        return [i for message in self.messages for i in message]


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_only_succeeded_provider_answers_of_a_sampled_tier_are_sent_together_off_the_loop() -> None:
    async def run() -> tuple[Published, list[CallRecord]]:
        published = Published()
        sampler = CallSampler(_config(0.05, 0.0), published, flush_seconds=0.05)
        light = [_record() for _ in range(3)]
        sampler.committed([*light[:2], _record(status=TaskStatus.FAILED), _record(mode=Mode.CACHE),
                           _record(provider=None), _record(Tier.COMPLEX)])  # no probes at a rate of 0
        sampler.committed(light[2:])
        assert published.messages == []  # gathered, not sent per call
        await _until(lambda: published.messages)
        await sampler.aclose()
        return published, light

    published, light = asyncio.run(run())
    assert published.messages == [[str(r.task_id) for r in light]]  # one message for the three
    assert threading.get_ident() not in published.threads  # the broker's blocking send is not on the loop


def test_nothing_is_sent_at_a_rate_of_0_and_probes_follow_their_own_rate() -> None:
    async def run(config: AppConfig, records: Sequence[CallRecord]) -> list[str]:
        published = Published()
        sampler = CallSampler(config, published, flush_seconds=0.01)
        sampler.committed(records)
        await sampler.aclose()
        return published.ids

    complex_call = _record(Tier.COMPLEX)
    assert asyncio.run(run(_config(0.0, 0.0), [_record(), _record(Tier.COMPLEX)])) == []
    assert asyncio.run(run(_config(0.0, 0.02), [_record(), complex_call])) == [str(complex_call.task_id)]


def test_stopping_sends_what_is_gathered_in_bounded_messages() -> None:
    async def run() -> tuple[Published, list[CallRecord]]:
        published = Published()
        sampler = CallSampler(_config(1.0, 1.0), published, flush_seconds=3600)  # only the stop sends
        records = [_record() for _ in range(MAX_IDS_PER_MESSAGE + 5)]
        sampler.committed(records)
        await sampler.aclose()
        return published, records

    published, records = asyncio.run(run())
    assert [len(m) for m in published.messages] == [MAX_IDS_PER_MESSAGE, 5]
    assert published.ids == [str(r.task_id) for r in records]


def test_a_broker_that_refuses_the_message_fails_no_call(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        sampler = CallSampler(_config(1.0, 1.0), Published(fail=True), flush_seconds=0.01)
        sampler.committed([_record()])
        await sampler.aclose()

    asyncio.run(run())
    assert "could not send 1 gateway calls to the quality monitor" in caplog.text


def test_the_recorder_tells_the_sampler_only_of_committed_records() -> None:
    async def run() -> tuple[list[list[uuid.UUID]], BaseException | None, list[CallRecord]]:
        told: list[list[uuid.UUID]] = []
        bad, good = _record(), _record()

        async def write(records: Sequence[CallRecord]) -> None:
            if any(r.task_id == bad.task_id for r in records):
                raise RuntimeError("refused")  # the group fails; retried one by one

        recorder = Recorder(write, committed=lambda records: told.append([r.task_id for r in records]))
        results = await asyncio.gather(recorder.record(bad), recorder.record(good), return_exceptions=True)
        await recorder.aclose()
        failure = results[0] if isinstance(results[0], BaseException) else None
        return told, failure, [bad, good]

    told, failure, (_, good) = asyncio.run(run())
    assert failure is not None  # the bad one's caller got RecordingFailed
    assert told == [[good.task_id]]


def test_callers_answer_before_the_commit_bookkeeping_runs() -> None:
    async def run() -> list[str]:
        order: list[str] = []

        async def write(records: Sequence[CallRecord]) -> None:
            return None

        recorder = Recorder(write, committed=lambda records: order.append(f"told of {len(records)}"))

        async def caller() -> None:
            await recorder.record(_record())
            order.append("answered")

        await asyncio.gather(caller(), caller())
        await recorder.aclose()
        return order

    assert asyncio.run(run()) == ["answered", "answered", "told of 2"]


def test_a_caller_cancelled_while_its_record_is_written_leaves_the_write_and_the_others_alone() -> None:
    async def run() -> tuple[list[uuid.UUID], list[list[uuid.UUID]], bool]:
        release = asyncio.Event()
        written: list[uuid.UUID] = []
        told: list[list[uuid.UUID]] = []

        async def write(records: Sequence[CallRecord]) -> None:
            await release.wait()
            written.extend(r.task_id for r in records)

        recorder = Recorder(write, committed=lambda records: told.append([r.task_id for r in records]))
        first, second = _record(), _record()
        leaving = asyncio.create_task(recorder.record(first))
        staying = asyncio.create_task(recorder.record(second))
        await asyncio.sleep(0.01)  # both are in the group being written
        leaving.cancel()
        await asyncio.sleep(0.01)
        release.set()
        await staying
        await recorder.aclose()
        return written, told, leaving.cancelled()

    written, told, cancelled = asyncio.run(run())
    assert cancelled
    assert len(written) == 2 and told == [written]  # the cancelled caller's call is recorded and counted


def test_a_failing_commit_hook_does_not_fail_the_call() -> None:
    async def run() -> None:
        async def write(records: Sequence[CallRecord]) -> None:
            return None

        def hook(records: Sequence[CallRecord]) -> None:
            raise ValueError("listener broke")

        recorder = Recorder(write, committed=hook)
        await recorder.record(_record())  # returns: the rows are committed
        await recorder.aclose()

    asyncio.run(run())
