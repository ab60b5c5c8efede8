"""A LangChain ``ChatOpenAI`` tool-calling loop through toolmend.

    python examples/langchain_loop.py
        runs a simulated buggy server and toolmend in this process, and the same loop through
        toolmend and straight to the server, to show the difference
    python examples/langchain_loop.py --base-url http://127.0.0.1:8080/v1 --model qwen3:8b
        runs it through a toolmend you started

Needs ``pip install langchain-openai``. LangSmith tracing stays off unless you set its variables.
"""

from __future__ import annotations

import asyncio
from typing import Any

from toolmend.sim.agent_loop import PROMPT, example_main, find_restaurant, get_weather


async def run_loop(base_url: str, calls: list[tuple[str, dict[str, Any]]],
                   model: str = "sim-model", max_steps: int = 6) -> str:
    from langchain_core.messages import AIMessageChunk, BaseMessage, HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool("get_weather")
    def weather(city: str, days: int) -> str:
        """Weather forecast for a city, for the next ``days`` days."""
        calls.append(("get_weather", {"city": city, "days": days}))
        return get_weather(city, days)

    @tool("find_restaurant")
    def restaurant(city: str, cuisine: str) -> str:
        """A restaurant in a city serving the given cuisine."""
        calls.append(("find_restaurant", {"city": city, "cuisine": cuisine}))
        return find_restaurant(city, cuisine)

    tools = {t.name: t for t in (weather, restaurant)}
    llm = ChatOpenAI(model=model, base_url=base_url, api_key="sk-local", streaming=True,
                     max_retries=0).bind_tools(list(tools.values()))
    messages: list[BaseMessage] = [HumanMessage(PROMPT)]
    for _ in range(max_steps):
        reply: AIMessageChunk | None = None
        async for chunk in llm.astream(messages):
            reply = chunk if reply is None else reply + chunk
        assert reply is not None
        messages.append(reply)
        if reply.invalid_tool_calls:
            raise RuntimeError(f"malformed tool calls: {reply.invalid_tool_calls}")
        if not reply.tool_calls:
            return str(reply.content)
        for call in reply.tool_calls:
            messages.append(await tools[call["name"]].ainvoke(call))
    raise RuntimeError(f"no answer after {max_steps} steps")


if __name__ == "__main__":
    raise SystemExit(asyncio.run(example_main(run_loop)))
