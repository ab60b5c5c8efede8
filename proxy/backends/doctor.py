"""``toolmend doctor``: look at the machine, probe running servers, recommend a stack.

The recommendation is a pure function of what was found (:func:`recommend`), so every branch
of the table is tested with made-up machines; only :func:`probe_hardware` touches the system.

Why these choices (the short version of the reasoning printed to the user):

- NVIDIA and several agents: vLLM. Continuous batching and prefix caching keep many agents'
  long prompts moving; its hermes/qwen tool parsers are the most complete.
- NVIDIA and one agent: Ollama with ``OLLAMA_KEEP_ALIVE=-1``. Easiest to run, and keeping the
  model resident avoids a reload between agent steps.
- AMD Strix Halo (gfx1151): llama.cpp (Vulkan or ROCm). vLLM's ROCm path there lags in both
  tool-call parsing and speed; llama-server with ``-np`` slots uses the unified memory well.
- Apple Silicon: Ollama for one agent; vllm-mlx (continuous batching on MLX) for several.
- CPU only: llama.cpp's llama-server; a mixture-of-experts model when memory allows.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from toolmend.backends.detect import Detected, detect
from toolmend.parsers.formats import FORMATS, format_for_model

STRIX_HALO_ARCH = "gfx1151"
TOOLMEND_PORT = 8080
#: Where the recommended backend listens, chosen not to collide with toolmend's own 8080.
BACKEND_PORTS = {"vllm": 8000, "ollama": 11434, "llamacpp": 8081, "vllm-mlx": 8000}
#: Well-known local ports probed when no upstream is given.
DEFAULT_PROBES = ("http://127.0.0.1:11434", "http://127.0.0.1:8000", "http://127.0.0.1:8081",
                  "http://127.0.0.1:30000", "http://127.0.0.1:1234")


@dataclass(slots=True)
class Gpu:
    vendor: str  # "nvidia" | "amd" | "apple"
    name: str
    memory_mb: int = 0
    arch: str = ""  # AMD gfx target, e.g. gfx1151


@dataclass(slots=True)
class Hardware:
    system: str = "Linux"
    machine: str = "x86_64"
    cpu_cores: int = 1
    memory_mb: int = 0
    gpus: list[Gpu] = field(default_factory=list)

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine in ("arm64", "aarch64")

    @property
    def vendor(self) -> str:
        if self.apple_silicon:
            return "apple"
        return self.gpus[0].vendor if self.gpus else "cpu"

    @property
    def strix_halo(self) -> bool:
        return any(g.vendor == "amd" and g.arch == STRIX_HALO_ARCH for g in self.gpus)

    @property
    def gpu_memory_mb(self) -> int:
        return sum(g.memory_mb for g in self.gpus)


@dataclass(slots=True)
class Recommendation:
    stack: str  # vllm | ollama | llamacpp | vllm-mlx | existing
    why: str
    model: str
    backend_command: list[str]
    backend_env: dict[str, str]
    toolmend_command: list[str]
    flags: list[tuple[str, str]]  # (flag, why it matters)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# probing ----------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 5.0) -> str:
    """Output of a system tool, or "" when it is missing or fails: absence is information."""
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        name, _, mem = line.rpartition(",")
        if name.strip():
            gpus.append(Gpu("nvidia", name.strip(), _int(mem)))
    return gpus


def parse_rocminfo(text: str) -> list[Gpu]:
    """GPU agents from ``rocminfo``: their gfx target and marketing name."""
    gpus = []
    for block in re.split(r"\n(?=\*{5,})", text):
        arch = re.search(r"^\s*Name:\s*(gfx[0-9a-f]+)\s*$", block, re.M)
        if arch and re.search(r"Device Type:\s*GPU", block):
            name = re.search(r"Marketing Name:\s*(.+)", block)
            gpus.append(Gpu("amd", name.group(1).strip() if name else arch.group(1),
                            0, arch.group(1)))
    return gpus


def _int(s: str) -> int:
    try:
        return int(float(s.strip()))
    except ValueError:
        return 0


def _memory_mb(system: str) -> int:
    if system == "Darwin":
        return _int(_run(["sysctl", "-n", "hw.memsize"]) or "0") // (1 << 20)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def probe_hardware() -> Hardware:
    system, machine = platform.system(), platform.machine()
    hw = Hardware(system, machine, os.cpu_count() or 1, _memory_mb(system))
    hw.gpus = parse_nvidia_smi(_run(["nvidia-smi", "--query-gpu=name,memory.total",
                                     "--format=csv,noheader,nounits"]))
    if not hw.gpus:
        hw.gpus = parse_rocminfo(_run(["rocminfo"]))
        if hw.gpus and not hw.strix_halo:
            vram = re.findall(r"VRAM Total Memory \(B\):\s*(\d+)",
                              _run(["rocm-smi", "--showmeminfo", "vram"]))
            for g, b in zip(hw.gpus, vram, strict=False):
                g.memory_mb = int(b) // (1 << 20)
    if hw.strix_halo:  # unified memory: the GPU can use most of system RAM
        for g in hw.gpus:
            g.memory_mb = g.memory_mb or hw.memory_mb
    return hw


async def probe_upstreams(urls: list[str], timeout: float = 1.5) -> list[tuple[str, Detected]]:
    found = await asyncio.gather(*(detect(u, timeout=timeout) for u in urls))
    return list(zip(urls, found, strict=True))


# the table --------------------------------------------------------------------------------------

def _tier(memory_mb: int, tiers: list[tuple[int, str]]) -> str:
    for need_gb, model in tiers:
        if memory_mb >= need_gb * 1024:
            return model
    return tiers[-1][1]


def _toolmend(backend: str, port: int, slots: int | None = None) -> list[str]:
    cmd = ["toolmend", "serve", "--upstream", f"http://127.0.0.1:{port}", "--backend", backend]
    if slots:
        cmd += ["--slots", str(slots)]
    return cmd


def recommend(hw: Hardware, agents: int = 1,
              upstreams: list[tuple[str, Detected]] | None = None,
              model: str | None = None) -> Recommendation:
    """The stack for this machine and this many concurrent agents. Pure."""
    agents = max(1, agents)
    running = [(u, d) for u, d in upstreams or () if d.kind not in ("unknown",)]
    if running:
        url, d = running[0]
        cmd = ["toolmend", "serve", "--upstream", url, "--backend", d.kind]
        if d.slots:
            cmd += ["--slots", str(d.slots)]
        notes = [f"also found {u} ({x.kind})" for u, x in running[1:]]
        return Recommendation(
            "existing", f"a {d.kind} server is already running at {url}"
            + (f" serving {d.model}" if d.model else ""), d.model or "", [], {}, cmd,
            [("--backend " + d.kind, "skips auto-detection at start-up"),
             ("--slots", "how many requests toolmend lets through at once; "
              "llama-server reports its own")], notes)

    if hw.vendor == "nvidia" and agents > 1:
        return _vllm(hw, agents, model)

    if hw.vendor == "nvidia" or (hw.vendor == "amd" and not hw.strix_halo and agents == 1):
        m = model or _tier(hw.gpu_memory_mb, [(40, "qwen3:32b"), (20, "qwen3:14b"),
                                              (10, "qwen3:8b"), (0, "qwen3:4b")])
        return _ollama(m, agents, f"{hw.gpus[0].name} and one agent: Ollama is the simplest "
                       "stack, and keeping the model loaded removes reloads between steps")

    if hw.vendor == "amd" and not hw.strix_halo:  # discrete AMD, several agents
        return _vllm(hw, agents, model)

    if hw.vendor == "apple":
        if agents == 1:
            m = model or _tier(hw.memory_mb, [(48, "qwen3:32b"), (24, "qwen3:14b"),
                                              (16, "qwen3:8b"), (0, "qwen3:4b")])
            return _ollama(m, agents, "Apple Silicon and one agent: Ollama (Metal, MLX engine "
                           "where available) with the model kept resident")
        m = model or _tier(hw.memory_mb, [(48, "mlx-community/Qwen3-32B-4bit"),
                                          (24, "mlx-community/Qwen3-14B-4bit"),
                                          (0, "mlx-community/Qwen3-8B-4bit")])
        port = BACKEND_PORTS["vllm-mlx"]
        flags = [("--continuous-batching", f"serves the {agents} agents together instead of "
                  "one after another")]
        return Recommendation(
            "vllm-mlx", f"Apple Silicon and {agents} agents: vllm-mlx batches them on MLX", m,
            ["vllm-mlx", "serve", m, "--host", "127.0.0.1", "--port", str(port),
             "--continuous-batching"], {}, _toolmend("openai", port), flags,
            ["install with: pip install vllm-mlx"])

    return _llamacpp(hw, agents, model)


#: toolmend tool format -> the vLLM ``--tool-call-parser`` that handles it, so the backend and
#: toolmend read the model's calls the same way (each format declares its own:
#: ``ToolFormat.vllm_parser``)
VLLM_TOOL_PARSERS: dict[str, str] = {
    name: fmt.vllm_parser for name, fmt in FORMATS.items() if fmt.vllm_parser}
#: The reverse: a ``--tool-call-parser`` given by hand -> the toolmend format to match it (with
#: the other vLLM names each format declares, ``ToolFormat.vllm_aliases``).
TOOL_FORMAT_FOR_VLLM_PARSER: dict[str, str] = {v: k for k, v in VLLM_TOOL_PARSERS.items()} | {
    alias: name for name, fmt in FORMATS.items() for alias in fmt.vllm_aliases}


def vllm_tool_parser(model: str) -> str:
    """The ``--tool-call-parser`` for a model, from its name; hermes when the name says nothing
    (the most common format, and what a Hermes-style chat template produces)."""
    return VLLM_TOOL_PARSERS.get(format_for_model(model) or "hermes", "hermes")


def _vllm(hw: Hardware, agents: int, model: str | None, port: int | None = None
          ) -> Recommendation:
    """vLLM: NVIDIA (or CPU) with several agents; the ROCm build on discrete AMD GPUs."""
    port = port or BACKEND_PORTS["vllm"]
    amd = hw.vendor == "amd"
    if amd:
        m = model or _tier(hw.gpu_memory_mb, [(80, "Qwen/Qwen3-32B"), (40, "Qwen/Qwen3-14B"),
                                              (0, "Qwen/Qwen3-8B")])
    else:
        m = model or _tier(hw.gpu_memory_mb, [(80, "Qwen/Qwen3-32B"), (40, "Qwen/Qwen3-14B"),
                                              (20, "Qwen/Qwen3-8B"), (0, "Qwen/Qwen3-4B")])
    parser = vllm_tool_parser(m)
    tool_flag = f"--enable-auto-tool-choice --tool-call-parser {parser}"
    priority = ("--scheduling-policy priority", "serves waiting requests by the priority "
                "toolmend sends (an agent's loop steps before long requests) and preempts long "
                "ones for them; without it vLLM serves in arrival order")
    if amd:
        flags = [("--gpu-memory-utilization 0.90", "KV cache for all agents"),
                 ("--max-model-len 32768", "so several agents fit"),
                 (tool_flag, "structured calls"), priority]
    else:
        flags = [("--gpu-memory-utilization 0.90", "leaves headroom for the CUDA context; the "
                  "rest becomes KV cache shared by all agents"),
                 ("--max-model-len 32768", "caps one agent's context so several fit in the KV "
                  "cache; raise it only if your agents need more"),
                 (tool_flag, "structured tool calls "
                  f"({parser} is right for {m.rsplit('/', 1)[-1]}; pick the parser for your "
                  "model family)"),
                 (f"--max-num-seqs {max(8, agents * 2)}", "enough sequences for every agent "
                  "plus retries"), priority]
    cmd = ["vllm", "serve", m, "--host", "127.0.0.1", "--port", str(port)]
    for f, _ in flags:
        cmd += f.split()
    if amd:
        return Recommendation(
            "vllm", f"AMD {hw.gpus[0].arch if hw.gpus else 'GPU'} with ROCm and {agents} "
            "agents: vLLM's ROCm build batches them", m, cmd,
            {"VLLM_USE_TRITON_FLASH_ATTN": "0"}, _toolmend("vllm", port), flags,
            ["use the rocm/vllm container image; toolmend repairs the tool calls its parser "
             "misses"])
    return Recommendation(
        "vllm", f"NVIDIA GPU and {agents} concurrent agents: vLLM batches them "
        "continuously and reuses their shared prompt prefixes", m, cmd, {},
        _toolmend("vllm", port), flags)


def _llamacpp(hw: Hardware, agents: int, model: str | None, port: int | None = None
              ) -> Recommendation:
    """llama.cpp's llama-server: AMD Strix Halo (Vulkan/ROCm) or CPU only."""
    port = port or BACKEND_PORTS["llamacpp"]
    ctx_per_agent = 16384 if hw.strix_halo else 8192
    if hw.strix_halo:
        m = model or _tier(hw.memory_mb, [(64, "Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M"),
                                          (0, "Qwen/Qwen3-8B-GGUF:Q4_K_M")])
        why = ("AMD Strix Halo (gfx1151): llama.cpp on Vulkan or ROCm; vLLM's tool-call parsing "
               "and speed on this chip lag behind, and llama-server's slots use the unified "
               "memory well")
    else:
        m = model or _tier(hw.memory_mb, [(32, "Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M"),
                                          (0, "Qwen/Qwen3-4B-GGUF:Q4_K_M")])
        why = ("no GPU found: llama.cpp's llama-server is the fastest CPU stack, and a "
               "mixture-of-experts model keeps tokens/s usable" if hw.memory_mb >= 32 * 1024
               else "no GPU found: llama.cpp's llama-server is the fastest CPU stack")
    model_args = ["-m", m] if m.endswith(".gguf") else ["-hf", m]
    flags = [("--jinja", "uses the model's chat template, which is what turns its tool calls "
              "into structured ones"),
             (f"-np {agents}", "one slot per agent so no agent waits behind another's prompt"),
             (f"-c {ctx_per_agent * agents}", f"total context, split across the slots "
              f"({ctx_per_agent} tokens each)"),
             ("--metrics", "Prometheus metrics (501 without it)")]
    if hw.strix_halo:
        flags.insert(1, ("-ngl 999", "all layers on the GPU"))
    else:
        flags.insert(1, (f"-t {hw.cpu_cores}", "one thread per core"))
    cmd = ["llama-server", *model_args, "--host", "127.0.0.1", "--port", str(port)]
    for f, _ in flags:
        cmd += f.split()
    notes = []
    if hw.strix_halo:
        notes.append("build llama.cpp with -DGGML_VULKAN=ON (or -DGGML_HIP=ON "
                     "-DAMDGPU_TARGETS=gfx1151), or use the "
                     "ghcr.io/ggml-org/llama.cpp:server-vulkan image")
    else:
        notes.append("for a quick look without any server: `toolmend serve` runs a small model "
                     "in-process")
    return Recommendation("llamacpp", why, m, cmd, {},
                          _toolmend("llamacpp", port, agents), flags, notes)


def _llama_cpp_python(model: str, port: int | None = None, n_ctx: int = 2048
                      ) -> Recommendation:
    """llama-cpp-python's own server: pip-installable, runs a local GGUF, no build step."""
    port = port or BACKEND_PORTS["llamacpp"]
    flags = [("--chat_format chatml-function-calling", "its only chat format that streams "
              "grammar-constrained tool calls"),
             (f"--n_ctx {n_ctx}", "context of its single slot")]
    cmd = ["python", "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port)]
    for f, _ in flags:
        cmd += f.split()
    return Recommendation(
        "llama-cpp-python", "llama-cpp-python's server: one pip install, one generation at a "
        "time", model, cmd, {}, ["toolmend", "serve", "--upstream", f"http://127.0.0.1:{port}",
                                 "--slots", "1"], flags,
        ["it streams tool calls only for a named tool_choice; toolmend mends what it sends"])


#: the stacks ``recommend_stack`` (and ``toolmend serve --launch``) can start
STACKS = ("vllm", "llama-server", "ollama", "llama-cpp-python")


def recommend_stack(stack: str, hw: Hardware, agents: int = 1, model: str | None = None,
                    port: int | None = None) -> Recommendation:
    """The recommended launch of one given stack on this machine (``recommend`` picks the
    stack; this is for a user who already chose it). Pure."""
    agents = max(1, agents)
    if stack == "vllm":
        return _vllm(hw, agents, model, port)
    if stack == "llama-server":
        return _llamacpp(hw, agents, model, port)
    if stack == "ollama":
        m = model or _tier(hw.gpu_memory_mb or hw.memory_mb,
                           [(40, "qwen3:32b"), (20, "qwen3:14b"), (10, "qwen3:8b"),
                            (0, "qwen3:4b")])
        return _ollama(m, agents, "Ollama, with the model kept resident between agent steps",
                       port)
    if stack == "llama-cpp-python":
        if not model:
            raise ValueError("llama-cpp-python needs a GGUF file (--model PATH.gguf)")
        return _llama_cpp_python(model, port)
    raise ValueError(f"unknown stack {stack!r}; one of {', '.join(STACKS)}")


def _ollama(model: str, agents: int, why: str, port: int | None = None
            ) -> Recommendation:
    port = port or BACKEND_PORTS["ollama"]
    env = {"OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_NUM_PARALLEL": str(max(1, agents))}
    flags = [("OLLAMA_KEEP_ALIVE=-1", "keeps the model loaded between agent steps (the default "
              "unloads after 5 minutes idle)"),
             (f"OLLAMA_NUM_PARALLEL={max(1, agents)}", "requests served at once"),
             ("OLLAMA_CONTEXT_LENGTH=32768", "Ollama's default context is small for agents; "
              "prompts beyond it are cut silently")]
    env["OLLAMA_CONTEXT_LENGTH"] = "32768"
    return Recommendation("ollama", why, model, ["ollama", "serve"], env,
                          _toolmend("ollama", port), flags,
                          [f"then: ollama pull {model}"])


# output -----------------------------------------------------------------------------------------

def format_report(hw: Hardware, agents: int, upstreams: list[tuple[str, Detected]],
                  rec: Recommendation) -> str:
    lines = ["toolmend doctor", ""]
    lines.append(f"machine: {hw.system} {hw.machine}, {hw.cpu_cores} cores, "
                 f"{hw.memory_mb / 1024:.0f} GB memory")
    if hw.gpus:
        for g in hw.gpus:
            extra = f" ({g.arch})" if g.arch else ""
            mem = f", {g.memory_mb / 1024:.0f} GB" if g.memory_mb else ""
            lines.append(f"gpu:     {g.vendor} {g.name}{extra}{mem}")
    elif hw.apple_silicon:
        lines.append("gpu:     Apple Silicon (unified memory)")
    else:
        lines.append("gpu:     none found (CPU only)")
    lines.append(f"agents:  {agents}")
    for url, d in upstreams:
        state = d.kind if d.kind != "unknown" else "nothing recognised"
        lines.append(f"probe:   {url}: {state}" + (f" ({d.model})" if d.model else "")
                     + (f", {d.slots} slots" if d.slots else ""))
    lines += ["", f"recommended: {rec.stack}", f"  why: {rec.why}"]
    if rec.backend_command:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in rec.backend_env.items())
        lines += ["", "start the backend:",
                  "  " + (env + " " if env else "") + shlex.join(rec.backend_command)]
    lines += ["", "start toolmend in front of it:", "  " + shlex.join(rec.toolmend_command)]
    if rec.flags:
        lines += ["", "flags that matter:"]
        lines += [f"  {f:<28} {why}" for f, why in rec.flags]
    if rec.notes:
        lines += ["", *(f"note: {n}" for n in rec.notes)]
    return "\n".join(lines)


async def _priority_notes(urls: list[str], found: list[tuple[str, Detected]]) -> list[str]:
    """Whether each running vLLM takes request priorities (one probe each)."""
    import aiohttp

    from toolmend.backends import vllm_priority

    notes = []
    async with aiohttp.ClientSession() as s:
        for url, (shown, d) in zip(urls, found, strict=True):
            if d.kind == "vllm":
                note = vllm_priority.doctor_note(await vllm_priority.probe(s, url, d.model))
                if note:
                    notes.append(f"{shown}: {note}")
    return notes


async def run_doctor(agents: int, upstreams: list[str], model: str | None = None,
                     as_json: bool = False) -> str:
    hw = await asyncio.to_thread(probe_hardware)
    from toolmend.backends.upstream import redacted

    # shown without user:password@ (the probes themselves used the URLs as given)
    found = [(redacted(u), d) for u, d in await probe_upstreams(upstreams
                                                                or list(DEFAULT_PROBES))]
    shown = found if upstreams else [(u, d) for u, d in found if d.kind != "unknown"]
    rec = recommend(hw, agents, found, model)
    rec.notes += await _priority_notes(upstreams or list(DEFAULT_PROBES), found)
    if as_json:
        import orjson

        return orjson.dumps({"hardware": asdict(hw), "agents": agents,
                             "upstreams": {u: d.as_dict() for u, d in found},
                             "recommendation": rec.as_dict()},
                            option=orjson.OPT_INDENT_2).decode()
    return format_report(hw, agents, shown, rec)
