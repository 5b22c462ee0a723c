"""`smart-select` follows the tenant's routing rules: a rule set through
`PUT /v1/routes` (or by the quality monitor) decides the tier of `auto` calls of its task type, for that
tenant only; an explicit tier still wins."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.support.stack import Stack

pytestmark = pytest.mark.integration


def tier_of(client: OpenAI, task_type: str, **metadata: str) -> str:
    response = client.chat.completions.with_raw_response.create(
        model="smart-select", messages=[{"role": "user", "content": "Summarize: the train was late again."}],
        metadata={"task_type": task_type, **metadata})
    return response.headers["x-tierbatch-tier"]


def test_smart_select_follows_the_tenants_rule(sim_reset: Stack) -> None:
    stack = sim_reset
    ruled, other = stack.new_tenant_key("ruled"), stack.new_tenant_key("other")
    with OpenAI(base_url=stack.api_url + "/v1", api_key=ruled, max_retries=0) as client, \
            OpenAI(base_url=stack.api_url + "/v1", api_key=other, max_retries=0) as other_client:
        assert tier_of(client, "digest") == "light"  # no rule, no config routing: the heuristic
        with stack.client(ruled) as native:
            put = native.put("/v1/routes/digest", json={"tier": "complex", "pinned": False})
            assert put.status_code == 200, put.text
        assert tier_of(client, "digest") == "complex"
        assert tier_of(client, "digest", tier="light") == "light"  # an explicit tier comes first
        assert tier_of(other_client, "digest") == "light"  # another tenant's rule is not ours


def test_gateway_refuses_calls_over_the_monthly_budget(sim_reset: Stack) -> None:
    """Budgets apply to the OpenAI surface too: policy `reject` answers 402 before any provider
    call, in OpenAI's error shape."""
    stack = sim_reset
    with stack.admin_client() as admin:
        created = admin.post("/v1/admin/tenants", json={"name": "broke", "monthly_budget_usd": "0"})
        assert created.status_code in (200, 201), created.text
        key = created.json()["api_key"]
    with OpenAI(base_url=stack.api_url + "/v1", api_key=key, max_retries=0) as client, \
            pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="smart-select", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 402
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "budget_exceeded"
    assert "Monthly budget reached" in error["message"]
    assert sum(stack.sim("GET", "/_sim/stats")["chat_calls"].values()) == 0
