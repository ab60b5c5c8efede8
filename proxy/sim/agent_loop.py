"""A scripted agent loop from a buggy server: what the demo, the examples and the agent tests run.

The "model" plans a picnic in three steps, and each tool call comes out the way real local
servers break them:

1. ``get_weather`` leaked into ``content`` as raw ``<tool_call>`` text (a server started without
   its tool parser), the marker split across deltas, and ``days`` sent as the string ``"3"``
   although the schema says integer;
2. ``find_restaurant`` as structured deltas whose argument tail is sent twice (a vLLM streaming
   bug), so a client that concatenates fragments gets ``{...}"}``;
3. the final answer as plain text.

Scenarios are picked by the number of tool results in the conversation (``step``), so the script
holds however many requests a client, or a retry, makes. An agent pointed straight at this
server never runs a tool; through toolmend it runs both with exactly :data:`INTENDED_CALLS`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from toolmend.sim.scenario import Scenario

#: Part of the user prompt; the loop's scenarios answer only conversations that contain it.
PROMPT_KEY = "picnic"
PROMPT = f"Plan a {PROMPT_KEY} in Oslo for the next 3 days: check the weather, then find a " \
         "seafood restaurant nearby."

#: The calls an agent must end up making, in order, with exactly these arguments.
INTENDED_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("get_weather", {"city": "Oslo", "days": 3}),
    ("find_restaurant", {"city": "Oslo", "cuisine": "seafood"}),
]

FINAL_ANSWER = "Sunny in Oslo for the next 3 days: picnic in Frognerparken, then dinner at " \
               "Fiskeriet."

#: The same tools as OpenAI tool definitions, for clients that send JSON rather than functions.
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "find_restaurant", "description": "A restaurant in a city by cuisine.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "cuisine": {"type": "string"}},
            "required": ["city", "cuisine"], "additionalProperties": False}}},
]


def get_weather(city: str, days: int) -> str:
    """Weather forecast for a city, for the next ``days`` days."""
    return f"{city}: sunny, 21 °C, for the next {days} days"


def find_restaurant(city: str, cuisine: str) -> str:
    """A restaurant in a city serving the given cuisine."""
    return f"Fiskeriet ({cuisine}, {city} centre)"


def agents_sdk_planner(model: Any, calls: list[tuple[str, dict[str, Any]]]) -> Any:
    """The OpenAI Agents SDK agent the two Agents SDK examples run, on ``model`` (a chat
    completions or a Responses model object): the two tools, each recording its calls in
    ``calls``. Imports the SDK (``pip install openai-agents``) only when called."""
    from agents import Agent, function_tool

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

    return Agent(name="planner", instructions="Plan with the tools, then answer briefly.",
                 tools=[weather, restaurant], model=model)


def scenarios(key: str = PROMPT_KEY) -> list[Scenario]:
    """The three steps, each answering only conversations whose user prompt contains ``key``."""
    leaked = ["Let me check the weather first.", " <tool", "_call>\n{\"name\": \"get_",
              "weather\", \"arguments\": {\"city\": \"Oslo\", ", "\"days\": \"3\"}}\n</tool_",
              "call>"]
    return [
        Scenario(name="agent-loop/leaked-call", chunks=leaked, match=key, step=0),
        Scenario.from_dict({
            "name": "agent-loop/duplicated-tail", "match": key, "step": 1,
            "tool_calls": [{"name": "find_restaurant",
                            "arguments": {"city": "Oslo", "cuisine": "seafood"}}],
            "quirks": {"duplicate_args_tail": True}}),
        Scenario(name="agent-loop/answer", content=FINAL_ANSWER, match=key, step=2),
    ]


def install(sim: Any, key: str = PROMPT_KEY) -> None:
    """Add the loop's scenarios to a :class:`~toolmend.sim.server.SimBackend`'s library."""
    for sc in scenarios(key):
        sim.library[sc.name] = sc


class LocalStack:
    """A buggy simulated server and a toolmend in front of it, both in this process.

    ``sim_url`` and ``toolmend_url`` are base URLs without ``/v1``. Used as ``async with``; both
    servers stop on exit.
    """

    def __init__(self, dialect: str = "vllm", **settings: Any) -> None:
        self.dialect = dialect
        self.settings = {"log_requests": False, **settings}
        self.sim: Any = None
        self.app: Any = None
        self.sim_url = ""
        self.toolmend_url = ""
        self._runner: Any = None

    async def __aenter__(self) -> LocalStack:
        from toolmend.server.app import build_app, start_server
        from toolmend.server.config import Settings
        from toolmend.sim.server import SimBackend

        self.sim = SimBackend(self.dialect)
        self.sim_url = await self.sim.start()
        install(self.sim)
        self.app = build_app(Settings(**self.settings), [self.sim_url])
        try:
            self._runner, port = await start_server(self.app, "127.0.0.1", 0)
        except BaseException:
            await self.sim.stop()
            raise
        self.toolmend_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.sim.stop()


#: ``run_loop(base_url, calls, model)``: runs the agent, appends each tool invocation to ``calls``
#: as ``(name, arguments)``, returns the final answer.
LoopRunner = Callable[[str, list[tuple[str, dict[str, Any]]], str], Awaitable[str]]


async def example_main(run_loop: LoopRunner, argv: list[str] | None = None) -> int:
    """The command line shared by ``examples/*``: a real server by URL, or the built-in contrast.

    Without ``--base-url`` it starts the buggy simulated server and toolmend in this process and
    runs the loop twice: through toolmend (both tools run, with exactly the intended arguments)
    and straight to the server (the leaked call reaches the agent as text; no tool runs).
    """
    import argparse

    p = argparse.ArgumentParser(description="an agent tool loop through toolmend")
    p.add_argument("--base-url", help="an OpenAI-compatible /v1 URL, e.g. a running toolmend's "
                   "http://127.0.0.1:8080/v1 (default: a simulated buggy server + toolmend)")
    p.add_argument("--model", default="sim-model", help="model name to ask for")
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args(argv)
    if args.base_url:
        calls: list[tuple[str, dict[str, Any]]] = []
        answer = await run_loop(args.base_url, calls, args.model)
        _report("agent", calls, answer)
        return 0
    async with LocalStack() as stack:
        ok = True
        for label, url in (("through toolmend", stack.toolmend_url),
                           ("straight to the buggy server", stack.sim_url)):
            calls = []
            try:
                answer = await run_loop(url + "/v1", calls, args.model)
            except Exception as e:  # a framework may give up on a broken reply
                answer = f"(the agent failed: {type(e).__name__}: {e})"
            _report(label, calls, answer)
            if label.startswith("through"):
                ok = calls == INTENDED_CALLS
        return 0 if ok else 1


def _report(label: str, calls: list[tuple[str, dict[str, Any]]], answer: str) -> None:
    print(f"{label}:")
    for name, arguments in calls:
        print(f"  tool ran: {name}({json.dumps(arguments)})")
    if not calls:
        print("  no tool ran")
    print(f"  answer:   {answer.strip()}")
    if calls:
        print("  arguments exactly as intended: "
              f"{'yes' if calls == INTENDED_CALLS else 'NO'}")
