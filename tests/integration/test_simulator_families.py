"""Task families through the simulator's HTTP surface: per-family agreement on chat calls and batch
lines, the counters of `GET /_sim/stats` and the per-answer verdicts of `GET /_sim/verdicts`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_simulator_batches import read_lines, run
from tests.integration.test_simulator_process import Sim, start

pytestmark = pytest.mark.integration

CONFIG = """
record_verdicts = true
[batch]
validating_seconds = 0.05
in_progress_seconds = 0.05
finalizing_seconds = 0.05
[models."*"]
latency_ms = [0, 0]
agreement = 0.9
[models."gpt-4o-mini".agreement_by_family]
classification = 0.7
reasoning = 0.5
[models."gpt-4o"]
reference = true
"""
ENDPOINT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    with start(tmp_path_factory.mktemp("sim-families"), CONFIG) as sim:
        yield sim


def messages(family: str, text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": f"Work through the request.\nTask family: {family}"},
            {"role": "user", "content": text}]


def chat(sim: Sim, model: str, body: dict[str, Any]) -> dict[str, Any]:
    response = sim.http.post(ENDPOINT, json={"model": model, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_family_agreement_counters_and_verdicts(sim: Sim) -> None:
    labels = {"type": "json_schema", "json_schema": {"name": "route", "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": ["billing", "account", "bug"]}}}}}
    calls = [{"messages": messages("classification", f"ticket {i}: refund please"), "response_format": labels}
             for i in range(120)]
    light = [chat(sim, "gpt-4o-mini", body) for body in calls]
    reference = [chat(sim, "gpt-4o", body) for body in calls]

    lines: list[dict[str, Any]] = [{"custom_id": f"r-{i}", "method": "POST", "url": ENDPOINT,
              "body": {"model": "gpt-4o-mini", "messages": messages("reasoning", f"puzzle {i}: plan the route")}}
             for i in range(150)]
    batch = run(sim, lines)
    assert batch["status"] == "completed"
    batched = {out["custom_id"]: out["response"]["body"] for out in read_lines(sim, batch["output_file_id"])}
    expected = {line["custom_id"]: chat(sim, "gpt-4o", {"messages": line["body"]["messages"]}) for line in lines}

    def same(one: dict[str, Any], other: dict[str, Any]) -> bool:
        return bool(one["choices"][0]["message"]["content"] == other["choices"][0]["message"]["content"])

    agreed_chat = sum(same(a, b) for a, b in zip(light, reference, strict=True))
    agreed_lines = sum(same(batched[cid], expected[cid]) for cid in batched)
    # about the configured rates (0.7 and 0.5), not the model's default 0.9
    assert 60 <= agreed_chat <= 105 and 45 <= agreed_lines <= 105, (agreed_chat, agreed_lines)

    stats = sim.stats()["family_answers"]
    assert stats["classification"] == {"gpt-4o-mini": {"answers": 120, "reference": agreed_chat},
                                       "gpt-4o": {"answers": 120, "reference": 120}}
    assert stats["reasoning"] == {"gpt-4o-mini": {"answers": 150, "reference": agreed_lines},
                                  "gpt-4o": {"answers": 150, "reference": 150}}

    # the verdict of each answer id is what comparing it with the reference model's answer shows
    verdicts = sim.http.get("/_sim/verdicts").json()
    assert verdicts["recording"] is True
    said = {**dict.fromkeys(verdicts["reference"], True), **dict.fromkeys(verdicts["other"], False)}
    for answer, ref in zip(light, reference, strict=True):
        assert said[answer["id"]] is same(answer, ref)
    for cid, body in batched.items():
        assert said[body["id"]] is same(body, expected[cid])
    assert all(said[ref["id"]] for ref in reference)

    # nothing is kept once recording is off, and a reset forgets what was kept
    sim.configure({"record_verdicts": False})
    chat(sim, "gpt-4o-mini", calls[0])
    assert len(sim.http.get("/_sim/verdicts").json()["other"] + sim.http.get("/_sim/verdicts").json()["reference"]) \
        == len(said)
    assert sim.http.post("/_sim/reset").status_code == 200
    assert sim.http.get("/_sim/verdicts").json() == {"recording": False, "reference": [], "other": []}
    assert json.dumps(sim.stats()["family_answers"]) == "{}"
