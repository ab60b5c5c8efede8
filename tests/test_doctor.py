"""``toolmend doctor``: the recommendation table, driven by made-up machines and probes."""

from __future__ import annotations

import shlex

import pytest

from toolmend.backends.detect import Detected
from toolmend.backends.doctor import (
    Gpu,
    Hardware,
    format_report,
    parse_nvidia_smi,
    parse_rocminfo,
    recommend,
)
from toolmend.server.cli import build_parser
from toolmend.server.config import Settings

GB = 1024

NVIDIA = Hardware("Linux", "x86_64", 32, 128 * GB, [Gpu("nvidia", "NVIDIA H100 80GB HBM3",
                                                       80 * GB)])
STRIX = Hardware("Linux", "x86_64", 32, 128 * GB, [Gpu("amd", "AMD Radeon 8060S", 128 * GB,
                                                      "gfx1151")])
MI300 = Hardware("Linux", "x86_64", 64, 512 * GB, [Gpu("amd", "AMD Instinct MI300X", 192 * GB,
                                                      "gfx942")])
MAC = Hardware("Darwin", "arm64", 12, 64 * GB)
CPU = Hardware("Linux", "x86_64", 2, 24 * GB)


def _toolmend_args_valid(cmd: list[str]) -> None:
    """The printed toolmend command must parse with toolmend's own CLI and settings."""
    assert cmd[:2] == ["toolmend", "serve"]
    ns = build_parser().parse_args(cmd[1:])
    Settings.load(ns, environ={})


def test_nvidia_several_agents_gets_vllm() -> None:
    r = recommend(NVIDIA, agents=4)
    assert r.stack == "vllm"
    cmd = shlex.join(r.backend_command)
    for flag in ("--gpu-memory-utilization 0.90", "--max-model-len",
                 "--enable-auto-tool-choice", "--tool-call-parser hermes",
                 "--scheduling-policy priority"):
        assert flag in cmd
    assert r.model == "Qwen/Qwen3-32B"
    assert r.toolmend_command[-2:] == ["--backend", "vllm"]
    _toolmend_args_valid(r.toolmend_command)


def test_nvidia_one_agent_gets_ollama_kept_warm() -> None:
    r = recommend(NVIDIA, agents=1)
    assert r.stack == "ollama"
    assert r.backend_env["OLLAMA_KEEP_ALIVE"] == "-1"
    assert any("ollama pull" in n for n in r.notes)
    assert "http://127.0.0.1:11434" in r.toolmend_command
    _toolmend_args_valid(r.toolmend_command)


@pytest.mark.parametrize("agents", [1, 4])
def test_strix_halo_gets_llama_cpp(agents: int) -> None:
    r = recommend(STRIX, agents=agents)
    assert r.stack == "llamacpp"
    assert "gfx1151" in r.why and "vLLM" in r.why
    cmd = r.backend_command
    assert cmd[0] == "llama-server" and "--jinja" in cmd and "-ngl" in cmd
    assert cmd[cmd.index("-np") + 1] == str(agents)
    assert any("VULKAN" in n for n in r.notes)
    assert r.toolmend_command[-2:] == ["--slots", str(agents)]
    _toolmend_args_valid(r.toolmend_command)


def test_other_amd_several_agents_gets_vllm_rocm() -> None:
    r = recommend(MI300, agents=8)
    assert r.stack == "vllm"
    assert recommend(MI300, agents=1).stack == "ollama"


def test_apple_silicon() -> None:
    one = recommend(MAC, agents=1)
    assert one.stack == "ollama" and "Apple" in one.why
    many = recommend(MAC, agents=3)
    assert many.stack == "vllm-mlx"
    assert "--continuous-batching" in many.backend_command
    _toolmend_args_valid(many.toolmend_command)


def test_cpu_only_gets_llama_cpp_with_threads() -> None:
    r = recommend(CPU, agents=2)
    assert r.stack == "llamacpp"
    cmd = r.backend_command
    assert cmd[cmd.index("-t") + 1] == "2"
    assert cmd[cmd.index("--port") + 1] != "8080"  # toolmend's own port
    assert r.model.startswith("Qwen/Qwen3-4B")
    assert recommend(Hardware("Linux", "x86_64", 16, 64 * GB), 1).model.startswith(
        "Qwen/Qwen3-30B-A3B")


def test_model_override_and_local_gguf() -> None:
    r = recommend(CPU, 1, model="/models/my.gguf")
    assert r.backend_command[1:3] == ["-m", "/models/my.gguf"]


def test_running_upstream_is_used() -> None:
    found = [("http://127.0.0.1:11434", Detected("unknown", details={"reason": "x"})),
             ("http://127.0.0.1:8081", Detected("llamacpp", "qwen3", 4))]
    r = recommend(CPU, 2, found)
    assert r.stack == "existing"
    assert r.toolmend_command == ["toolmend", "serve", "--upstream", "http://127.0.0.1:8081",
                                  "--backend", "llamacpp", "--slots", "4"]
    _toolmend_args_valid(r.toolmend_command)


def test_report_has_commands_and_flags() -> None:
    r = recommend(NVIDIA, 4)
    text = format_report(NVIDIA, 4, [], r)
    assert "recommended: vllm" in text
    assert "vllm serve Qwen/Qwen3-32B" in text
    assert "toolmend serve --upstream http://127.0.0.1:8000" in text
    assert "flags that matter:" in text
    text = format_report(CPU, 1, [], recommend(Hardware("Linux", "x86_64", 2, 24 * GB,
                                                        []), 1))
    assert "CPU only" in text


def test_parsers_for_vendor_tools() -> None:
    assert parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564\nNVIDIA A100, 81920\n") == [
        Gpu("nvidia", "NVIDIA GeForce RTX 4090", 24564), Gpu("nvidia", "NVIDIA A100", 81920)]
    rocminfo = """*******
Agent 1
*******
  Name:                    AMD RYZEN AI MAX+ 395 w/ Radeon 8060S
  Device Type:             CPU
*******
Agent 2
*******
  Name:                    gfx1151
  Marketing Name:          AMD Radeon Graphics
  Device Type:             GPU
"""
    assert parse_rocminfo(rocminfo) == [Gpu("amd", "AMD Radeon Graphics", 0, "gfx1151")]
    assert parse_nvidia_smi("") == []


async def test_run_doctor_probes_a_real_upstream() -> None:
    from toolmend.backends.doctor import run_doctor
    from toolmend.sim.server import SimBackend

    sim = SimBackend("llamacpp", model="qwen3", slots=2)
    await sim.start()
    try:
        text = await run_doctor(2, [sim.url])
    finally:
        await sim.stop()
    assert f"probe:   {sim.url}: llamacpp (qwen3), 2 slots" in text
    assert f"toolmend serve --upstream {sim.url} --backend llamacpp --slots 2" in text
