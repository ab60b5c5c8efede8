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

from toolmend.sim.agent_loop import PROMPT, example_main, find_restaurant, get_weather


async def run_loop(base_url: str, calls: list[tuple[str, dict[str, Any]]],
                   model: str = "sim-model", *, streamed: bool = True) -> str:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI

    @function_tool(name_override="get_weather")
    def weather(city: str, days: int) -> str:
        """Weather forecast for a city, for the next ``days`` days."""
        calls.append(("get_weather", {"city": city, "days": days}))
        return get_weather(city, days)

    @function_tool(name_override="find_restaurant")
    def restaurant(city: str, cuisine: str) -> str:
        """A restaurant in a city serving the given cuisine."""
        calls.append(("find_restaurant", {"city": city, "cuisine": cuisine}))
        return find_restaurant(city, cuisine)

    client = AsyncOpenAI(base_url=base_url, api_key="sk-local", max_retries=0)
    agent = Agent(name="planner", instructions="Plan with the tools, then answer briefly.",
                  tools=[weather, restaurant],
                  model=OpenAIResponsesModel(model=model, openai_client=client))
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
