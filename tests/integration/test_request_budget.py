"""`requests_per_minute` counts HTTP requests: an intern batch sent as one request per call
is charged per call, over real HTTP against the loopback server."""

from __future__ import annotations

import anyio
from helpers import make_questions

from backends.base import Call, http_requests
from backends.gate import CallGate
from backends.limits import EndpointLimiter
from backends.openai_chat import OpenAIChat
from bench.loopback import LoopbackServer
from mics.config import ModelConfig
from mics.prompts import intern_prompt
from mics.types import Reply, Sampling


def rpm_limiter(rpm: float) -> EndpointLimiter:
    return EndpointLimiter(ModelConfig(name="e", backend="openai", model="m",
                                       base_url="http://127.0.0.1:1/v1", requests_per_minute=rpm))


def test_a_turn_takes_one_request_per_http_request_and_may_run_into_debt():
    limiter = rpm_limiter(6)
    anyio.run(limiter.wait_turn, 4)
    assert limiter.requests is not None
    assert 1.9 < limiter.requests.level < 2.5  # 6 - 4, plus what refilled meanwhile
    assert limiter.requests.wait_time(4) > 10  # the next batch of 4 waits for the budget
    big = rpm_limiter(6)
    anyio.run(big.wait_turn, 10)  # larger than a minute's budget: allowed once, then debt
    assert big.requests is not None and big.requests.level < -3.5


def test_an_openai_intern_batch_is_charged_per_completion(run_store):
    q = make_questions(1)[0]
    calls = [Call(intern_prompt(q, f"### Step 1: s{k}."), Sampling(temperature=t))
             for k in range(3) for t in (1.2, 0.2)]
    with LoopbackServer(models={"sim-intern": {"role": "intern", "skill": 0.9}}) as srv:
        model = OpenAIChat(ModelConfig(name="intern-ep", backend="openai", model="sim-intern",
                                       base_url=f"{srv.url}/v1", requests_per_minute=60))
        gate = CallGate(run_store)

        async def go() -> list:
            try:
                return await gate.rollouts(model, calls, qid="q")
            finally:
                await model.aclose()

        out = anyio.run(go)
        sent = len(srv.log)
    assert all(isinstance(r, Reply) for r in out)
    assert http_requests(model, calls) == sent == len(calls) == 6
    budget = gate.limiter(model).requests
    assert budget is not None and budget.level < 60 - 6 + 1.5  # 6 taken, not 1 (1/s refill)


def test_a_model_without_requests_for_is_one_request_per_batch():
    class Batched:
        pass

    assert http_requests(Batched(), [object()] * 5) == 1  # type: ignore[arg-type]
