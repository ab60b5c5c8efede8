"""The ``toolmend`` command: ``serve``, ``sim`` and friends."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from toolmend.server.config import Settings, add_arguments


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from toolmend.server import access_log

    access_log.install(sys.stderr)  # request lines in batches: see access_log's docstring


def _use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _drain_until_done_or_signalled(app: Any, grace: float) -> None:
    from toolmend.server.lifecycle import drain

    drained = asyncio.ensure_future(drain(app, grace))
    again = asyncio.ensure_future(_wait_for_signal())
    await asyncio.wait({drained, again}, return_when=asyncio.FIRST_COMPLETED)
    for task in (drained, again):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _serve(settings: Settings) -> int:
    from toolmend.server import gc_tuning
    from toolmend.server.app import build_app, start_server

    log = logging.getLogger("toolmend")
    cleanup = []
    upstreams = list(settings.upstream)
    launched = None
    if settings.launch != "none":
        from toolmend.backends.launcher import (
            LaunchError,
            ManagedBackend,
            apply_plan,
            plan_from_settings,
        )

        if upstreams:
            print("toolmend: --launch starts its own upstream; drop --upstream", file=sys.stderr)
            return 2
        try:
            plan = plan_from_settings(settings)
            apply_plan(settings, plan)
            launched = ManagedBackend(plan, ready_timeout=settings.launch_ready_timeout)
            await launched.start()
        except LaunchError as e:
            print(f"toolmend: {e}", file=sys.stderr)
            return 1
        cleanup.append(launched.stop)
        upstreams = list(settings.upstream)
        log.info("toolmend reads tool calls as %s (backend %s, %d slots)", settings.tool_format,
                 settings.backend, settings.slots)
    elif not upstreams:
        from toolmend.backends.embedded import start_embedded

        backend = await start_embedded(settings)
        cleanup.append(backend.stop)
        upstreams = [backend.url]
        log.info("embedded backend: %s (model %s)", backend.url, backend.model_name)
    app = build_app(settings, upstreams)
    if launched is not None:
        launched.attach(app)  # /readyz and the queue follow the child from here on
    try:
        # the drain (below) is the graceful part: what runs past it is cut within a second
        runner, port = await start_server(app, settings.host, settings.port,
                                          shutdown_timeout=1.0)
    except BaseException:
        for fn in reversed(cleanup):
            await fn()
        raise
    from toolmend.backends.detect import describe
    from toolmend.server.app import UPSTREAM

    up = app[UPSTREAM]
    if launched is None:
        log.info("%s", describe(up.base_url(), await up.detect()))
    base = f"http://{settings.host}:{port}"
    via = f" (launched {settings.launch}, starting)" if launched is not None else ""
    # the replicas' URLs: credentials in a configured URL never reach stdout (or its logs)
    print(f"toolmend listening on {base}/v1 -> {', '.join(up.urls)}{via}", flush=True)
    gc_tuning.settle()  # startup's objects live as long as the process: see gc_tuning
    print(f"  try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
          "-d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'", flush=True)
    rc = 0
    try:
        stop = asyncio.ensure_future(_wait_for_signal())
        waits: set[asyncio.Future[Any]] = {stop}
        if launched is not None and launched.failed is not None:
            waits.add(launched.failed)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if launched is not None and launched.failed in done:
            print(f"toolmend: {launched.failed.result()}", file=sys.stderr, flush=True)
            rc = 1
        else:  # SIGTERM: drain, unless a second signal says to stop at once
            await _drain_until_done_or_signalled(app, settings.drain_grace)
    finally:
        await runner.cleanup()  # stop taking requests first, then end the backend
        for fn in reversed(cleanup):
            await fn()
    return rc


async def _sim(args: argparse.Namespace) -> int:
    from toolmend.sim.server import SimBackend

    sim = SimBackend(args.dialect, args.model, slots=args.slots, ttft=args.ttft,
                     token_delay=args.token_delay, prefill_per_token=args.prefill_per_token,
                     default_tokens=args.tokens, context=args.context)
    fixtures = Path(args.fixtures) if args.fixtures else Path(str(files("toolmend.fixtures")))
    if fixtures.is_dir():
        sim.load_fixtures(fixtures)
    url = await sim.start(args.host, args.port)
    print(f"toolmend sim ({args.dialect}, {args.slots} slots, {len(sim.library)} scenarios) "
          f"on {url}", flush=True)
    try:
        await _wait_for_signal()
    finally:
        await sim.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolmend",
                                description="Tool-call-safe OpenAI-compatible proxy for local LLMs")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy",
                           description="Run the proxy. Options also come from the TOML file "
                           "and TOOLMEND_* environment variables; flags win.")
    add_arguments(serve)
    sim = sub.add_parser("sim", help="run the simulated backend",
                         description="A simulated vLLM / llama-server / Ollama server that "
                         "replays scripted replies, models time and slots, and injects faults.")
    sim.add_argument("--dialect", default="vllm",
                     choices=("vllm", "llamacpp", "ollama", "llama-cpp-python", "openai"))
    sim.add_argument("--model", default="sim-model")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--slots", type=int, default=4, help="concurrent generations; more wait FIFO")
    sim.add_argument("--ttft", type=float, default=0.02, help="seconds to the first token")
    sim.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    sim.add_argument("--prefill-per-token", type=float, default=0.0,
                     help="extra seconds to first token per prompt token")
    sim.add_argument("--tokens", type=int, default=16, help="tokens in the default reply")
    sim.add_argument("--context", type=int, default=None,
                     help="context length in tokens: no reply is longer than it leaves room "
                     "for (default: 4096; 2048 for llamacpp)")
    sim.add_argument("--fixtures", help="folder of scenario JSON files (default: bundled)")
    trace = sub.add_parser("trace", help="show recent agent sessions as step timelines",
                           description="Per-step timelines (queue, time to first token, "
                           "generation, the agent's tool time) of recent agent sessions from a "
                           "running toolmend, with a Jaeger link for each trace.")
    from toolmend.telemetry.trace_view import add_arguments as add_trace_arguments

    add_trace_arguments(trace)
    demo = sub.add_parser("demo", help="run a short agent loop through toolmend and show it",
                          description="A short agent loop (real tool calls to local functions) "
                          "through toolmend against a simulated server that breaks tool calls, "
                          "or a real one with --upstream; prints each step, what toolmend "
                          "repaired, and the per-step timeline.")
    from toolmend.server.demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    doctor = sub.add_parser("doctor", help="inspect this machine and recommend a stack",
                            description="Look at the GPUs and memory, probe running servers, "
                            "and print the serving stack to use with a ready-to-run command.")
    doctor.add_argument("--agents", type=int, default=1, help="agents that run at the same time")
    doctor.add_argument("--upstream", action="append", default=[], metavar="URL",
                        help="server to probe (repeatable; default: the usual local ports)")
    doctor.add_argument("--model", help="model to put in the commands instead of the suggestion")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; for ``serve``, what follows ``--`` goes to the launched server."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:  # serve --launch STACK -- ARGS: ARGS go to the launched server
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough:
        if args.command != "serve":
            parser.error("arguments after -- are for the server that serve --launch starts")
        args.launch_args = [*(args.launch_args or []), *passthrough]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        try:
            settings = Settings.load(args, args.config)
            from toolmend.server.auth import parse_networks

            parse_networks(settings.client_limit_exempt)  # refused here, not at start-up
            parse_networks(settings.metrics_networks, "metrics_networks")
            from toolmend.server.gateway import GatewayConfig

            GatewayConfig.from_settings(settings)
        except (ValueError, OSError) as e:
            print(f"toolmend: configuration error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        _setup_logging(settings.log_level)
        _use_uvloop()
        raise SystemExit(asyncio.run(_serve(settings)))
    if args.command == "trace":
        from toolmend.telemetry.trace_view import run

        raise SystemExit(run(args))
    if args.command == "demo":
        from toolmend.server.demo import run as run_demo

        raise SystemExit(run_demo(args))
    if args.command == "doctor":
        from toolmend.backends.doctor import run_doctor

        print(asyncio.run(run_doctor(args.agents, args.upstream, args.model, args.json)))
        raise SystemExit(0)
    if args.command == "sim":
        _setup_logging("info")
        _use_uvloop()
        raise SystemExit(asyncio.run(_sim(args)))
