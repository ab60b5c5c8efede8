"""An OpenAI Agents SDK tool loop on its default model, the Responses API, through toolmend.

    python examples/openai_agents_responses_loop.py
        runs a simulated buggy server and toolmend in this process, and the loop through
        toolmend and straight to the server (which speaks chat completions only: the direct
        run fails at its first request)
    python examples/openai_agents_responses_loop.py --base-url http://127.0.0.1:8080/v1 \\
            --model qwen3:8b
        runs it through a toolmend you started

The SDK's ``OpenAIResponsesModel`` calls ``POST /v1/responses``, which toolmend translates to the
backend's chat API and back, mending and checking each call on the way. Needs
``pip install openai-agents``. Tracing export is turned off: nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from toolmend.sim.agent_loop import PROMPT, agents_sdk_planner, example_main


async def run_loop(base_url: str, calls: list[tuple[str, dict[str, Any]]],
                   model: str = "sim-model", *, streamed: bool = True) -> str:
    from agents import OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI
    client = AsyncOpenAI(base_url=base_url, api_key="sk-local", max_retries=0)
    agent = agents_sdk_planner(OpenAIResponsesModel(model=model, openai_client=client), calls)
    try:
        if not streamed:
            return str((await Runner.run(agent, PROMPT, max_turns=6)).final_output)
        result = Runner.run_streamed(agent, PROMPT, max_turns=6)
        async for _ in result.stream_events():
            pass
        return str(result.final_output)
    finally:
        await client.close()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(example_main(run_loop)))
