"""``toolmend serve --launch STACK``: the serving process as a supervised child.

Many local set-ups start their server by hand with flags copied from somewhere, and get the
tool-call ones wrong (vLLM without ``--tool-call-parser``, llama-server without ``--jinja``). As a
sidecar that starts the server itself, toolmend uses the flags ``toolmend doctor`` recommends
(:func:`toolmend.backends.doctor.recommend_stack`), and reads the model's tool calls with
the format that matches the parser the server was started with.

The child gets its own process group (vLLM forks an engine process; a terminal's Ctrl-C must not
reach it before toolmend has stopped taking requests), a free loopback port, and its output
forwarded line by line with a ``[stack]`` prefix. While it is starting or restarting, the fair
queue is paused: requests wait up to their time-to-live (``--queue-ttl``, or the per-request
deadline header) and then get a 503 that says the backend is restarting, rather than a burst of
connection errors. A child that dies is restarted with exponential backoff; one that never
became ready the first time is a configuration error and toolmend exits with its log tail.

:func:`plan_launch` is pure given the hardware, so the command for each stack is unit-tested
without starting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from toolmend.backends.doctor import (
    STACKS,
    TOOL_FORMAT_FOR_VLLM_PARSER,
    Hardware,
    probe_hardware,
    recommend_stack,
)

if TYPE_CHECKING:
    from toolmend.scheduling.scheduler import FairScheduler
    from toolmend.server.config import Settings

log = logging.getLogger("toolmend.backends.launcher")

#: Concurrent requests each stack is started for when ``--slots`` does not say.
DEFAULT_AGENTS = {"vllm": 8, "llama-server": 2, "ollama": 1, "llama-cpp-python": 1}
#: What answers 200 once the stack can serve (llama-server's /health is 503 while loading).
READY_PATHS = {"vllm": "/v1/models", "llama-server": "/health", "ollama": "/api/version",
               "llama-cpp-python": "/v1/models"}
#: toolmend's ``--backend`` for each stack (llama-cpp-python's server is found by probing).
BACKENDS = {"vllm": "vllm", "llama-server": "llamacpp", "ollama": "ollama",
            "llama-cpp-python": "auto"}
#: Restart backoff: first wait, growth, ceiling (seconds).
RESTART_BACKOFF = (1.0, 2.0, 30.0)
#: A child that stayed up this long has its backoff reset: its next death is a new incident.
STABLE_AFTER = 60.0
LOG_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """The launched server could not be started; the message says why, with its log tail."""


@dataclass
class LaunchPlan:
    """Everything needed to start one stack and to point toolmend at it."""

    stack: str
    argv: list[str]
    env: dict[str, str]  # added to toolmend's own environment
    port: int
    backend: str  # toolmend --backend
    tool_format: str  # toolmend --tool-format matching the server's own parser ("auto": by name)
    slots: int
    model: str
    ready_path: str
    why: list[tuple[str, str]] = field(default_factory=list)  # flag -> why it matters

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def free_port() -> int:
    """A loopback port free right now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flag_groups(argv: Sequence[str]) -> list[list[str]]:
    """Split arguments into groups: a flag and the values after it (or a lone value)."""
    groups: list[list[str]] = []
    for a in argv:
        if a.startswith("-") and not _is_number(a):
            groups.append([a])
        elif groups and groups[-1][0].startswith("-") and "=" not in groups[-1][0]:
            groups[-1].append(a)
        else:
            groups.append([a])
    return groups


def _is_number(a: str) -> bool:
    try:
        float(a)
    except ValueError:
        return False
    return True


def _flag_name(a: str) -> str:
    return a.split("=", 1)[0]


def merge_args(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``base`` plus ``extra``, where a flag in ``extra`` replaces the same flag in ``base``.

    The recommendation is a starting point: ``-- --max-model-len 1024`` must win over the
    recommended 32768, not come second and leave the server to pick one.
    """
    given = {_flag_name(g[0]) for g in _flag_groups(extra) if g[0].startswith("-")}
    kept = [g for g in _flag_groups(base) if _flag_name(g[0]) not in given]
    return [a for g in kept for a in g] + list(extra)


def flag_value(argv: Sequence[str], *names: str) -> str | None:
    """The value of the last occurrence of any of ``names`` (``--x v`` or ``--x=v``)."""
    found = None
    for g in _flag_groups(argv):
        head = g[0]
        if _flag_name(head) in names:
            if "=" in head:
                found = head.split("=", 1)[1]
            elif len(g) > 1:
                found = g[1]
    return found


def plan_launch(stack: str, *, port: int, extra_args: Sequence[str] = (), model: str = "",
                slots: int = 0, binary: str = "", hw: Hardware | None = None,
                python: str = sys.executable) -> LaunchPlan:
    """The command, environment and toolmend settings for one stack. Pure given ``hw``."""
    if stack not in STACKS:
        raise LaunchError(f"unknown stack {stack!r}; one of {', '.join(STACKS)}")
    if stack == "llama-cpp-python" and not model:
        from toolmend.backends.embedded import default_model_path

        try:
            model = str(default_model_path())
        except RuntimeError as e:
            raise LaunchError(str(e)) from e
    hw = hw if hw is not None else probe_hardware()
    agents = slots if slots > 0 else DEFAULT_AGENTS[stack]
    rec = recommend_stack(stack, hw, agents, model or None, port)
    argv = list(rec.backend_command)
    if stack == "llama-cpp-python":
        argv[0] = python  # the interpreter that has llama_cpp installed: this one
    if binary:
        argv[0:1] = shlex.split(binary)
    argv = merge_args(argv, list(extra_args))
    env = dict(rec.backend_env)
    from toolmend.parsers.formats import format_for_model

    tool_format = format_for_model(rec.model) or "auto"
    if stack == "vllm":
        parser = flag_value(argv, "--tool-call-parser")
        tool_format = TOOL_FORMAT_FOR_VLLM_PARSER.get(parser or "", tool_format)
        n = flag_value(argv, "--max-num-seqs")
    elif stack == "llama-server":
        n = flag_value(argv, "-np", "--parallel")
    elif stack == "ollama":
        env["OLLAMA_HOST"] = f"127.0.0.1:{port}"
        if slots > 0:
            env["OLLAMA_NUM_PARALLEL"] = str(slots)
        n = env.get("OLLAMA_NUM_PARALLEL")
    else:
        n = "1"  # llama-cpp-python's server runs one generation at a time
    try:
        n_slots = max(1, int(n)) if n else agents
    except ValueError:
        n_slots = agents
    return LaunchPlan(stack, argv, env, port, BACKENDS[stack], tool_format, n_slots, rec.model,
                      READY_PATHS[stack], list(rec.flags))


def plan_from_settings(settings: Settings, hw: Hardware | None = None) -> LaunchPlan:
    return plan_launch(settings.launch, port=settings.launch_port or free_port(),
                       extra_args=settings.launch_args, model=settings.model,
                       slots=settings.slots, binary=settings.launch_binary, hw=hw)


def apply_plan(settings: Settings, plan: LaunchPlan) -> None:
    """Point toolmend at the launched server; options the user set explicitly win."""
    settings.upstream = [plan.url]
    if settings.backend == "auto":
        settings.backend = plan.backend
    if settings.tool_format == "auto":
        settings.tool_format = plan.tool_format
    if settings.slots <= 0:
        settings.slots = plan.slots
    if plan.stack == "vllm" and flag_value(plan.argv, "--scheduling-policy") == "priority":
        settings.vllm_priority = True  # it was started to take them (vllm_priority.py)


def _stderr_sink(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class ManagedBackend:
    """One launched serving process: start, readiness, log forwarding, restarts, stop."""

    def __init__(self, plan: LaunchPlan, *, ready_timeout: float = 900.0, grace: float = 10.0,
                 backoff: tuple[float, float, float] = RESTART_BACKOFF,
                 log_sink: Callable[[str], None] = _stderr_sink) -> None:
        self.plan = plan
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.backoff = backoff
        self.log_sink = log_sink
        self.state = "stopped"  # starting | ready | restarting | failed | stopped
        self.reason = ""  # why it is not ready, for /readyz and queue errors
        self.restarts = 0
        self.last_exit: int | None = None
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.failed: asyncio.Future[LaunchError] | None = None
        self._scheduler: FairScheduler | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str:
        return self.plan.url

    def status(self) -> dict[str, Any]:
        return {"stack": self.plan.stack, "state": self.state, "pid": self.pid,
                "url": self.url, "restarts": self.restarts, "last_exit": self.last_exit,
                "reason": self.reason or None}

    # wiring --------------------------------------------------------------------------------
    def attach(self, app: web.Application) -> None:
        """Let ``/readyz`` report this child, and hold the queue while it is not ready."""
        from toolmend.server.app import SCHEDULER

        app[LAUNCHED] = self
        self._scheduler = app[SCHEDULER]
        if self.state != "ready":
            self._scheduler.pause(self.reason or f"the {self.plan.stack} backend is starting")

    def _set(self, state: str, reason: str = "") -> None:
        self.state, self.reason = state, reason
        sched = self._scheduler
        if state == "ready":
            self.ready.set()
            if sched is not None:
                sched.resume()
        else:
            self.ready.clear()
            if sched is not None:
                sched.pause(reason)

    # life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the child and supervise it; returns at once (see :meth:`wait_ready`)."""
        loop = asyncio.get_running_loop()
        self.failed = loop.create_future()
        self._stopping = False
        await self._spawn()
        self._set("starting", f"the {self.plan.stack} backend is starting")
        self._supervisor = asyncio.create_task(self._supervise(), name="launcher-supervisor")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until the child answers; raises :class:`LaunchError` if it can never start."""
        assert self.failed is not None
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            done, _ = await asyncio.wait({ready, self.failed}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self.failed in done:
            raise self.failed.result()
        if ready not in done:
            raise LaunchError(f"{self.plan.stack} not ready within {timeout} s")

    async def _spawn(self) -> None:
        plan = self.plan
        log.info("launching %s: %s", plan.stack, plan.describe())
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *plan.argv, env={**os.environ, **plan.env}, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        except OSError as e:
            raise LaunchError(f"cannot start {plan.stack} ({plan.argv[0]}): {e}; install it, "
                              "or give the command with --launch-binary") from e
        self._started_at = time.monotonic()
        self._pump = asyncio.create_task(self._forward_logs(self.proc), name="launcher-logs")

    async def _forward_logs(self, proc: asyncio.subprocess.Process) -> None:
        prefix = f"[{self.plan.stack}] "
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the stream limit: take what is there
                raw = await proc.stdout.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.tail.append(line)
            with contextlib.suppress(Exception):
                self.log_sink(prefix + line)

    def _log_tail(self) -> str:
        return "\n".join(self.tail) or "(no output)"

    async def _probe(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(self.url + self.plan.ready_path) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _until_ready(self) -> bool:
        """Poll the child until it answers (True), dies or runs out of time (False)."""
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.1
        timeout = aiohttp.ClientTimeout(total=3.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while time.monotonic() < deadline:
                if proc.returncode is not None:
                    return False
                if await self._probe(http):
                    return True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), delay)
                delay = min(delay * 1.5, 2.0)
        return False

    async def _supervise(self) -> None:
        first, delay = True, self.backoff[0]
        while not self._stopping:
            proc = self.proc
            assert proc is not None
            if await self._until_ready():
                log.info("%s ready on %s (pid %d)", self.plan.stack, self.url, proc.pid)
                self._set("ready")
                first = False
                await proc.wait()
            if self._stopping:
                return
            if proc.returncode is None:  # never became ready in time: it is hung
                await self._terminate(proc)
            self.last_exit = proc.returncode
            if self._pump is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._pump, 2.0)  # the last lines say why it died
            what = (f"exited with code {proc.returncode}" if self.state == "ready"
                    else f"did not become ready (exit code {proc.returncode})")
            if first:
                err = LaunchError(f"{self.plan.stack} {what}; its last output:\n"
                                  f"{self._log_tail()}")
                self._set("failed", str(err).splitlines()[0])
                assert self.failed is not None
                if not self.failed.done():
                    self.failed.set_result(err)
                return
            if time.monotonic() - self._started_at > STABLE_AFTER:
                delay = self.backoff[0]
            self.restarts += 1
            reason = (f"the {self.plan.stack} backend {what}; restart {self.restarts} "
                      f"in {delay:g} s")
            log.warning("%s", reason)
            self._set("restarting", reason)
            while not self._stopping:
                await asyncio.sleep(delay)
                delay = min(delay * self.backoff[1], self.backoff[2])
                try:
                    await self._spawn()
                    break
                except LaunchError as e:  # the binary vanished (an upgrade): keep trying
                    log.error("%s", e)
            self._set("restarting", f"the {self.plan.stack} backend is restarting "
                      f"(restart {self.restarts})")

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the whole process group, SIGKILL after the grace period."""
        pgid = proc.pid  # start_new_session: the child leads its own group
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.grace)
            except TimeoutError:
                log.warning("%s did not stop within %g s; killing it", self.plan.stack,
                            self.grace)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                await proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # anything the leader left behind

    async def stop(self) -> None:
        """Stop supervising and end the child (and its process group)."""
        self._stopping = True
        sup, self._supervisor = self._supervisor, None
        if sup is not None:
            sup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sup
        if self.proc is not None:
            await self._terminate(self.proc)
            self.last_exit = self.proc.returncode
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, 2.0)
        self.state, self.reason = "stopped", "toolmend is shutting down"
        self.ready.clear()
        log.info("%s stopped", self.plan.stack)


LAUNCHED = web.AppKey("launched", ManagedBackend)
