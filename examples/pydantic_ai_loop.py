"""A pydantic-ai agent tool loop through toolmend.

    python examples/pydantic_ai_loop.py
        runs a simulated buggy server and toolmend in this process, and the same loop through
        toolmend and straight to the server, to show the difference
    python examples/pydantic_ai_loop.py --base-url http://127.0.0.1:8080/v1 --model qwen3:8b
        runs it through a toolmend you started

Needs ``pip install "pydantic-ai-slim[openai]"``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from toolmend.sim.agent_loop import PROMPT, example_main, find_restaurant, get_weather


async def run_loop(base_url: str, calls: list[tuple[str, dict[str, Any]]],
                   model: str = "sim-model") -> str:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.run import AgentRunResultEvent

    agent = Agent(OpenAIChatModel(model, provider=OpenAIProvider(base_url=base_url,
                                                                 api_key="sk-local")),
                  instructions="Plan with the tools, then answer briefly.")

    @agent.tool_plain(name="get_weather")
    def weather(city: str, days: int) -> str:
        """Weather forecast for a city, for the next ``days`` days."""
        calls.append(("get_weather", {"city": city, "days": days}))
        return get_weather(city, days)

    @agent.tool_plain(name="find_restaurant")
    def restaurant(city: str, cuisine: str) -> str:
        """A restaurant in a city serving the given cuisine."""
        calls.append(("find_restaurant", {"city": city, "cuisine": cuisine}))
        return find_restaurant(city, cuisine)

    answer = ""
    # streamed end to end; run_stream() would stop at the first text, this runs the whole loop
    async with agent.run_stream_events(PROMPT) as events:
        async for event in events:
            if isinstance(event, AgentRunResultEvent):
                answer = str(event.result.output)
    return answer


if __name__ == "__main__":
    raise SystemExit(asyncio.run(example_main(run_loop)))
