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

from .config import Settings, add_arguments


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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


async def _serve(settings: Settings) -> int:
    from .app import build_app, start_server

    log = logging.getLogger("toolmend")
    cleanup = []
    upstreams = list(settings.upstream)
    if not upstreams:
        from .embedded import start_embedded

        backend = await start_embedded(settings)
        cleanup.append(backend.stop)
        upstreams = [backend.url]
        log.info("embedded backend: %s (model %s)", backend.url, backend.model_name)
    app = build_app(settings, upstreams)
    runner, port = await start_server(app, settings.host, settings.port)
    from .app import UPSTREAM
    from .detect import describe

    up = app[UPSTREAM]
    log.info("%s", describe(up.base_url(), await up.detect()))
    base = f"http://{settings.host}:{port}"
    print(f"toolmend listening on {base}/v1 -> {', '.join(upstreams)}", flush=True)
    print(f"  try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
          "-d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'", flush=True)
    try:
        await _wait_for_signal()
    finally:
        await runner.cleanup()
        for fn in reversed(cleanup):
            await fn()
    return 0


async def _sim(args: argparse.Namespace) -> int:
    from .sim.server import SimBackend

    sim = SimBackend(args.dialect, args.model, slots=args.slots, ttft=args.ttft,
                     token_delay=args.token_delay, prefill_per_token=args.prefill_per_token,
                     default_tokens=args.tokens)
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
    sim.add_argument("--fixtures", help="folder of scenario JSON files (default: bundled)")
    trace = sub.add_parser("trace", help="show recent agent sessions as step timelines",
                           description="Per-step timelines (queue, time to first token, "
                           "generation, the agent's tool time) of recent agent sessions from a "
                           "running toolmend, with a Jaeger link for each trace.")
    from .trace_view import add_arguments as add_trace_arguments

    add_trace_arguments(trace)
    doctor = sub.add_parser("doctor", help="inspect this machine and recommend a stack",
                            description="Look at the GPUs and memory, probe running servers, "
                            "and print the serving stack to use with a ready-to-run command.")
    doctor.add_argument("--agents", type=int, default=1, help="agents that run at the same time")
    doctor.add_argument("--upstream", action="append", default=[], metavar="URL",
                        help="server to probe (repeatable; default: the usual local ports)")
    doctor.add_argument("--model", help="model to put in the commands instead of the suggestion")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = Settings.load(args, args.config)
        except (ValueError, OSError) as e:
            print(f"toolmend: configuration error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        _setup_logging(settings.log_level)
        _use_uvloop()
        raise SystemExit(asyncio.run(_serve(settings)))
    if args.command == "trace":
        from .trace_view import run

        raise SystemExit(run(args))
    if args.command == "doctor":
        from .doctor import run_doctor

        print(asyncio.run(run_doctor(args.agents, args.upstream, args.model, args.json)))
        raise SystemExit(0)
    if args.command == "sim":
        _setup_logging("info")
        _use_uvloop()
        raise SystemExit(asyncio.run(_sim(args)))
