"""Checking large tool schemas in worker processes, so the event loop never waits for it.

Checking a schema (``parsers.schemas.check_schema``: meta-validation, RE2 compiles, ref
resolution) costs about half a second per 256 KB of properties, and a client that varies the
property names misses the cache every time. Done on the event loop, one such request stalled
every other request for seconds. Here:

* a request's new schemas that are small (``schema_inline_bytes`` together, the common case:
  real tool sets, and those are cached after the first request) are checked in-process, which
  costs a few milliseconds and no round trip;
* larger ones go to a worker process. A thread would not do: once a thread's time budget is
  spent it cannot be stopped, while a process can be killed. A job that overruns
  ``schema_check_timeout`` kills its worker and is refused (413);
* a worker is started on first need and exits after :data:`IDLE_EXIT` seconds without work or
  once it has grown past :data:`MAX_WORKER_RSS`, so the memory the checking took is given back
  to the system (CPython keeps freed arenas in a long-lived process).

The protocol on the worker's stdin/stdout is length-prefixed frames: a JSON header (the limits
and the number of schemas), then each schema's canonical bytes; the answer is one JSON frame,
a list with ``{"depth", "scoped"}`` per schema, stopping at the first ``{"error", "pointer"}``.

This module is also the worker's entry point (``python -m toolmend.pipeline.schema_worker``);
it imports nothing heavy at the top so a worker starts quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import struct
import subprocess
import sys
from typing import IO, Any, Final

import orjson

from toolmend.parsers.schemas import (
    Checked,
    CompiledSchema,
    SchemaError,
    SchemaLimits,
    ToolPlan,
    Toolset,
    ValidatorCache,
    build_schema,
    check_schema,
    plan_tools,
    schema_cache,
)
from toolmend.server.memory import note_large_work

log = logging.getLogger("toolmend")

_FRAME: Final = struct.Struct("!I")
#: seconds a worker waits for work before it exits (its memory goes back to the system)
IDLE_EXIT: Final = 30.0
#: resident size past which a worker is retired after its current job
MAX_WORKER_RSS: Final = 256 * 1024 * 1024
#: jobs that may wait for a busy worker, per worker, before new ones are refused (503)
WAITING_PER_WORKER: Final = 8
#: address space a worker may use: a hostile schema ends in MemoryError there, not here
WORKER_MEMORY_LIMIT: Final = 2 * 1024 * 1024 * 1024


class CheckerBusy(Exception):
    """Too many large-schema checks are waiting for a worker already."""


# --- the worker process ----------------------------------------------------------------------

def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def _check_one(raw: bytes, limits: SchemaLimits) -> dict[str, Any]:
    try:
        checked = check_schema(raw, limits)
    except SchemaError as exc:
        return {"error": exc.message, "pointer": exc.pointer}
    except MemoryError:
        return {"error": "schema needs more memory to check than a worker may use",
                "pointer": ""}
    return {"depth": checked.depth, "scoped": checked.scoped}


def main() -> None:
    """Answer jobs from stdin until it closes."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT, WORKER_MEMORY_LIMIT))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = _read_frame(stdin)
        if header is None:
            return
        job = orjson.loads(header)
        limits = SchemaLimits(**job["limits"])
        results: list[dict[str, Any]] = []
        for _ in range(job["count"]):
            raw = _read_frame(stdin)
            if raw is None:
                return
            if results and "error" in results[-1]:
                continue  # read the rest of the job, check no more of it
            results.append(_check_one(raw, limits))
        answer = orjson.dumps(results)
        stdout.write(_FRAME.pack(len(answer)) + answer)
        stdout.flush()


# --- the event loop's side -------------------------------------------------------------------

class _Worker:
    """One worker process and its pipes; used by one job at a time.

    Started with :class:`subprocess.Popen` in a thread, its pipes then handed to the event
    loop: forking from the loop thread (what ``asyncio.create_subprocess_exec`` does) held the
    loop for up to 1.4 s on a busy machine, the parent being suspended until the child execs.
    """

    def __init__(self, popen: subprocess.Popen[bytes], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.popen = popen
        self.reader = reader
        self.writer = writer
        self.jobs = 0

    @classmethod
    async def start(cls) -> _Worker:
        loop = asyncio.get_running_loop()
        popen = await loop.run_in_executor(None, functools.partial(
            subprocess.Popen, [sys.executable, "-m", "toolmend.pipeline.schema_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        assert popen.stdin is not None and popen.stdout is not None
        reader = asyncio.StreamReader(limit=2 ** 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     popen.stdout)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), popen.stdin)
        return cls(popen, reader, asyncio.StreamWriter(transport, protocol, None, loop))

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    async def run(self, limits: SchemaLimits, raws: list[bytes]) -> list[dict[str, Any]]:
        header = orjson.dumps({"limits": dataclasses.asdict(limits), "count": len(raws)})
        self.writer.write(_FRAME.pack(len(header)) + header)
        for raw in raws:
            self.writer.write(_FRAME.pack(len(raw)))
            self.writer.write(raw)
        await self.writer.drain()
        (size,) = _FRAME.unpack(await self.reader.readexactly(_FRAME.size))
        answer = orjson.loads(await self.reader.readexactly(size))
        self.jobs += 1
        return answer  # type: ignore[no-any-return]

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.popen.pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    async def wait(self) -> int:
        """Its exit status, once it has exited (reaped in a thread: ``wait`` blocks)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.popen.wait)

    async def stop(self) -> None:
        """Close its stdin (it exits at once between jobs), kill it if it does not."""
        if self.alive:
            self.writer.close()
            try:
                await asyncio.wait_for(asyncio.shield(self.wait()), 2.0)
            except TimeoutError:
                self.kill()
        else:
            self.writer.close()
        await self.wait()

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()


class SchemaCompiler:
    """A request's tools, compiled without blocking the event loop for long.

    ``workers=0`` checks everything in-process (the embedded backend, some tests).
    """

    def __init__(self, *, workers: int = 1, timeout: float = 10.0,
                 inline_bytes: int = 32 * 1024, cache: ValidatorCache = schema_cache,
                 idle_exit: float = IDLE_EXIT, max_worker_rss: int = MAX_WORKER_RSS) -> None:
        self.workers = workers
        self.timeout = timeout
        self.inline_bytes = inline_bytes
        self.cache = cache
        self.idle_exit = idle_exit
        self.max_worker_rss = max_worker_rss
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots = asyncio.Semaphore(max(1, workers))
        self._waiting = 0
        self._reaper: asyncio.TimerHandle | None = None
        self._stops: set[asyncio.Task[None]] = set()
        self.started = 0  # worker processes started so far (for tests and benchmarks)
        self.killed = 0  # of which killed for overrunning the timeout

    @property
    def processes(self) -> list[_Worker]:
        return [*self._idle, *self._busy]

    async def compile_tools(self, tools: Any, tool_choice: object,
                            limits: SchemaLimits) -> Toolset:
        """Like ``parsers.schemas.compile_tools``, with large new schemas checked in a worker.
        Raises :class:`SchemaError` (the client's fault) or :class:`CheckerBusy`."""
        plan = plan_tools(tools, tool_choice, limits=limits, cache=self.cache)
        misses = plan.misses
        checked: dict[int, Checked] = {}
        if misses and (self.workers <= 0 or plan.miss_bytes() <= self.inline_bytes):
            for index in misses:
                try:
                    checked[index] = check_schema(plan.raws[index], limits)
                except SchemaError as exc:
                    raise plan.located(index, exc) from None
        elif misses:
            answers = await self._in_worker(limits, [plan.raws[i] for i in misses])
            for index, answer in zip(misses, answers, strict=False):
                if "error" in answer:
                    raise plan.located(index, SchemaError(None, answer["error"],
                                                          answer["pointer"]))
                checked[index] = Checked(answer["depth"], answer["scoped"])
        return plan.finish(checked, self.cache, await self._build_large(plan, checked))

    async def _build_large(self, plan: ToolPlan, checked: dict[int, Checked]
                           ) -> dict[str, CompiledSchema]:
        """Build the validators of large schemas one at a time, letting other requests run in
        between. A large schema gets no Rust gate (``GATE_MAX_BYTES``), so building one is
        decoding its bytes: a few milliseconds. (In a thread it would not help: decoding holds
        the GIL, and a thread holding it while the machine is busy kept the event loop waiting
        for seconds.)"""
        built: dict[str, CompiledSchema] = {}
        for raw, digest, verdict in plan.to_build(checked):
            if len(raw) > self.inline_bytes:
                await asyncio.sleep(0)
                entry = build_schema(raw, digest, verdict)
                self.cache.put(entry)
                built[digest] = entry
                note_large_work()  # short-lived unless cached: give its pages back after
        return built

    async def _in_worker(self, limits: SchemaLimits, raws: list[bytes]
                         ) -> list[dict[str, Any]]:
        if self._waiting >= WAITING_PER_WORKER * max(1, self.workers):
            raise CheckerBusy(f"{self._waiting} large tool-schema checks are already waiting")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        worker: _Worker | None = None
        try:
            worker = await self._take()
            try:
                answers = await asyncio.wait_for(worker.run(limits, raws), self.timeout)
            except TimeoutError:
                self.killed += 1
                raise SchemaError(
                    None, f"the tool schemas took longer than {self.timeout:g} s to check "
                    "(schema_check_timeout)", "/tools", too_large=True,
                    code="tool_schemas_too_complex") from None
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
                raise SchemaError(
                    None, "the tool schemas could not be checked: the checking process "
                    "failed on them", "/tools", too_large=True,
                    code="tool_schemas_too_complex") from None
            if len(answers) != len(raws) and not (answers and "error" in answers[-1]):
                raise SchemaError(None, "the schema checker answered out of step", "/tools")
            self._give_back(worker)
            worker = None
            return answers
        finally:
            if worker is not None:  # overran, failed, or its request went away mid-job
                self._busy.discard(worker)
                worker.kill()
                self._stop_later(worker)
            self._slots.release()

    async def _take(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                self._busy.add(worker)
                return worker
        worker = await _Worker.start()
        self.started += 1
        self._busy.add(worker)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        if worker.rss() > self.max_worker_rss:
            self._stop_later(worker)  # its arenas go back to the system with it
            return
        self._idle.append(worker)
        self._arm_reaper()

    def _arm_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self._reaper = asyncio.get_running_loop().call_later(self.idle_exit, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        idle, self._idle = self._idle, []
        for worker in idle:
            self._stop_later(worker)

    def _stop_later(self, worker: _Worker) -> None:
        task = asyncio.get_running_loop().create_task(worker.stop())
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def close(self) -> None:
        """Stop every worker (the app's cleanup)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        workers = [*self._idle, *self._busy]
        self._idle, self._busy = [], set()
        for worker in workers:
            worker.kill()
        await asyncio.gather(*(w.stop() for w in workers), *self._stops,
                             return_exceptions=True)


if __name__ == "__main__":
    main()
