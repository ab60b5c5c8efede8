"""The format registry is the format files: every file on disk is registered, detected,
covered by fixtures and benchmarked, and a bad declaration is a clear error.

The files are found by listing ``parsers/formats/`` here, independently of the registry's own
walk. Which format a model name or a marker picks is written down literally below, as toolmend
has always mapped them; a new format adds its row.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from toolmend.parsers.autodetect import AutoParser, shared_marker, start_markers
from toolmend.parsers.formats import FORMATS, ToolFormat, collect, format_for_model, make_parser
from toolmend.parsers.formats.base import MarkerParser
from toolmend.parsers.mender import TRIGGERS

from . import test_formats_a, test_formats_b
from .format_harness import FIXTURES, run

ROOT = Path(__file__).resolve().parent.parent
FORMATS_DIR = ROOT / "parsers" / "formats"
#: files of the formats folder that are not format files (``_*.py`` are helpers too)
NOT_FORMAT_FILES = {"__init__.py", "base.py"}

#: model name -> the format it picks (None: the name says nothing, markers decide)
MODEL_NAMES: dict[str, str | None] = {
    "Qwen/Qwen3-8B": "hermes",
    "Qwen/Qwen2.5-7B-Instruct": "hermes",
    "Qwen/QwQ-32B": "hermes",
    "qwen3:8b": "hermes",
    "mlx-community/Qwen3-8B-4bit": "hermes",
    "Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M": "hermes",
    "NousResearch/Hermes-3-Llama-3.1-8B": "hermes",
    "NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO": "hermes",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "hermes",
    "arcee-ai/Trinity-Mini": "hermes",
    "arcee-ai/Trinity-Large-Preview": "hermes",
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": "qwen3_coder",
    "qwen3coder": "qwen3_coder",
    "XiaomiMiMo/MiMo-V2-Flash": "qwen3_coder",
    "XiaomiMiMo/MiMo-V2.5-Pro": "qwen3_coder",
    "Nanbeige/Nanbeige4-3B-Thinking-2511": "qwen3_coder",
    "Nanbeige/Nanbeige4.1-3B": "qwen3_coder",
    "deepseek-ai/DeepSeek-V3.1": "deepseek_v31",
    "deepseek-ai/DeepSeek-V3.2-Exp": "deepseek_v31",
    "deepseek-v3-1": "deepseek_v31",
    "deepseek-ai/DeepSeek-V3.2": "deepseek_v32",
    "deepseek-ai/DeepSeek-V3.2-Speciale": "deepseek_v32",
    "deepseek-v3.2": "deepseek_v32",
    "deepseek-ai/DeepSeek-V4": "deepseek_v32",
    "deepseek-ai/DeepSeek-V3-0324": "deepseek_v3",
    "deepseek-ai/DeepSeek-R1": "deepseek_v3",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "deepseek_v3",
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": "pythonic",
    "meta-llama/Llama-3.2-3B-Instruct": "pythonic",
    "meta-llama/Llama-3.2-1B-Instruct": "pythonic",
    "unsloth/Llama-3.2-3B-Instruct-GGUF": "pythonic",
    "llama4": "pythonic",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3_json",
    "meta-llama/Llama-3.3-70B-Instruct": "llama3_json",
    "llama3.1:8b": "llama3_json",
    "llama3.2:3b": "llama3_json",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistral",
    "mistralai/Magistral-Small-2506": "mistral",
    "mistralai/Devstral-Small-2505": "mistral",
    "mistralai/Ministral-8B-Instruct-2410": "mistral",
    "codestral": "mistral",
    "ibm-granite/granite-3.3-8b-instruct": "granite",
    "ibm-granite/granite-4.0-h-small": "hermes",
    "ibm-granite/granite-4.0-micro": "hermes",
    "granite4:tiny-h": "hermes",
    "ibm-granite/granite-20b-functioncalling": "granite_20b_fc",
    "swiss-ai/Apertus-8B-Instruct-2509": "apertus",
    "apertus:70b": "apertus",
    "rednote-hilab/dots.llm1.inst": "dots",
    "dots.llm1": "dots",
    "google/gemma-4-31B-it": "gemma4",
    "google/gemma-4-E2B-it": "gemma4",
    "gemma4:e4b": "gemma4",
    "CohereLabs/c4ai-command-a-03-2025": "cohere_command3",
    "CohereLabs/command-a-reasoning-08-2025": "cohere_command3",
    "CohereLabs/command-a-vision-07-2025": "cohere_command3",
    "CohereLabs/command-a-plus": "cohere_command4",
    "command-a-plus-fp8": "cohere_command4",
    "CohereLabs/c4ai-command-r-plus-08-2024": None,
    "inkling": "inkling",
    "acme/Inkling-Preview": "inkling",
    "zai-org/GLM-4.5": "glm45",
    "zai-org/GLM-4.6": "glm45",
    "zai-org/GLM-4.7": "glm45",
    "glm-4-5": "glm45",
    "inclusionAI/Ling-3.0-flash": "glm45",
    "ling-3": "glm45",
    "inclusionAI/Ling-1T": None,
    "poolside/Laguna-XS.2": "glm45",
    "laguna-xs.2": "glm45",
    "XHToken/Spark-X2.5-4B": "glm45",
    "XHToken/Spark-X2.5-1.7B": "glm45",
    "spark2_5": "glm45",
    "moonshotai/Kimi-K2-Instruct": "kimi_k2",
    "moonshotai/Kimi-K2-Thinking": "kimi_k2",
    "openai/gpt-oss-20b": "gpt_oss",
    "gpt-oss:120b": "gpt_oss",
    "google/functiongemma-270m-it": "functiongemma",
    "microsoft/Phi-4-mini-instruct": "phi4_mini",
    "phi4-mini": "phi4_mini",
    "MiniMaxAI/MiniMax-M2": "minimax_m2",
    "ByteDance-Seed/Seed-OSS-36B-Instruct": "seed_oss",
    "seed-oss:36b": "seed_oss",
    "meituan-longcat/LongCat-Flash-Chat": "longcat",
    "meituan-longcat/LongCat-Flash-Thinking": "longcat",
    "baidu/ERNIE-4.5-21B-A3B-PT": "ernie45",
    "baidu/ERNIE-4.5-300B-A47B-Base-PT": "ernie45",
    "ernie-4.5-21b-a3b-thinking": "ernie45",
    "allenai/Olmo-3-7B-Instruct": "olmo3",
    "allenai/Olmo-3-32B-Think": "olmo3",
    "allenai/Olmo-3.1-32B-Think": "olmo3",
    "allenai/OLMo-2-1124-7B-Instruct": None,
    "Salesforce/Llama-xLAM-2-8b-fc-r": "xlam",
    "Salesforce/xLAM-2-32b-fc-r": "xlam",
    "Salesforce/xLAM-7b-fc-r": "xlam",
    "ai-sage/GigaChat3-10B-A1.8B": "gigachat3",
    "ai-sage/GigaChat3-702B-A36B-preview": "gigachat3",
    "ai-sage/GigaChat3.5-10B-A1.8B": "gigachat35",
    "gigachat-3.5": "gigachat35",
    "tencent/Hunyuan-A13B-Instruct": "hunyuan",
    "tencent/Hunyuan-7B-Instruct": "hunyuan",
    "ai21labs/AI21-Jamba-Mini-1.7": "jamba",
    "ai21labs/AI21-Jamba-1.5-Large": "jamba",
    "stepfun-ai/step3": "step3",
    "stepfun-ai/Step-3.5-Flash": "qwen3_coder",
    "step3p5": "qwen3_coder",
    "internlm/internlm2_5-7b-chat": "internlm",
    "internlm/Intern-S1": "internlm",
    "internlm/internlm3-8b-instruct": "internlm",
    "LiquidAI/LFM2-1.2B-Tool": "lfm2",
    "LiquidAI/LFM2.5-1.2B-Instruct": "lfm2",
    "lfm2:1.2b": "lfm2",
    "IQuestLab/IQuest-Q1": "iquest_q1",
    "iquest-q1": "iquest_q1",
    "IQuestLab/IQuest-Coder-V1-40B-Instruct": None,
    "pfnet/plamo-3-nict-31b-base": "plamo3",
    "plamo3": "plamo3",
    "pfnet/plamo-2-8b": None,
    "openbmb/MiniCPM5-1B": "minicpm5",
    "openbmb/MiniCPM5-2B-GPTQ": "minicpm5",
    "openbmb/MiniCPM4-8B": None,
    "moonshotai/Kimi-K3": "kimi_k3",
    "kimi-k3-thinking": "kimi_k3",
    "IFM/K2-Horizon-7B": "k2_horizon",
    "k2-horizon:7b": "k2_horizon",
    "MiniMaxAI/MiniMax-M3": "minimax_m3",
    "minimax-m3": "minimax_m3",
    "Muse-Glimmer-30B": "muse_glimmer",
    "muse-glimmer": "muse_glimmer",
    "THUDM/glm-4-9b": None,
    "microsoft/phi-4": None,
    "google/gemma-3-4b-it": None,
    "sim-model": None,
    "default": None,
}
#: formats no model name picks: only ``--tool-format`` does
ONLY_BY_FLAG = {"generic_json"}

#: reply -> the format marker detection picks for a model whose name says nothing (None: none)
MARKER_TEXTS: dict[str, str | None] = {
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>': "hermes",
    '<tool_call>[{"name": "f", "arguments": {}}]</tool_call>': "hermes",
    "<tool_call>": "hermes",
    "<tool_call>\n<function=f>\n</function>\n</tool_call>": "qwen3_coder",
    "<tool_call>\n<fun": "glm45",
    "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>": "glm45",
    "[TOOL_CALLS]f[ARGS]{}": "mistral",
    "[THINK]a plan[/THINK]done": "mistral",
    "<think>plan [TOOL_CALLS]f[ARGS]{}": "mistral",
    '<|python_tag|>{"name": "f", "parameters": {}}': "llama3_json",
    "<|python_start|>[f()]<|python_end|>": "pythonic",
    "<think>plan <|python_start|>[f()]": None,
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}"
    "<｜tool▁call▁end｜>": "deepseek_v31",
    "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜>": "deepseek_v31",
    '<|tool_call|>[{"name": "f", "arguments": {}}]': "granite",
    '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n'
    "</｜DSML｜function_calls>": "deepseek_v32",
    '<｜DSML｜tool_calls><｜DSML｜invoke name="f"/></｜DSML｜tool_calls>': "deepseek_v32",
    '<think>plan <｜DSML｜invoke name="f">': "deepseek_v32",
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
    "{}<|tool_call_end|><|tool_calls_section_end|>": "kimi_k2",
    "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>": "gpt_oss",
    "<think>plan <|channel|>commentary": None,
    "<start_function_call>call:f{}<end_function_call>": "functiongemma",
    '<minimax:tool_call>\n<invoke name="f">\n</invoke>\n</minimax:tool_call>': "minimax_m2",
    "<seed:tool_call>\n<function=f>\n</function>\n</seed:tool_call>": "seed_oss",
    "<seed:think>plan</seed:think>done": "seed_oss",
    '<longcat_tool_call>{"name": "f", "arguments": {}}</longcat_tool_call>': "longcat",
    "<longcat_think>plan</longcat_think>done": "longcat",
    "<function_calls>f()</function_calls>": "olmo3",
    "<think>plan <function_calls>f(a=1)": "olmo3",
    '<|function_call|>{"name": "f", "arguments": {}}': "gigachat3",
    '<｜GCML｜tool_calls><｜GCML｜invoke name="f"></｜GCML｜invoke>'
    "</｜GCML｜tool_calls>": "gigachat35",
    'function call<|role_sep|>{"name": "f", "arguments": {}}': None,
    '<tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>': "hunyuan",
    "<tool_calls are> not a block": None,
    "<tool_calls:opensource>": None,
    "<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜>"
    '<steptml:invoke name="f"></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜>': "step3",
    '<|action_start|><|plugin|>\n{"name": "f", "parameters": {}}<|action_end|>': "internlm",
    "<|action_start|> <|plugin|>{}": "internlm",
    "<|action_start|><|interpreter|>print(1)": None,
    "<|tool_call_start|>[f()]<|tool_call_end|>": "lfm2",
    "<think>plan <|tool_call_start|>[f(a=1)]": "lfm2",
    '<function_call> {"name": "f", "arguments": {}}': "granite_20b_fc",
    "<function_calls>\nf(a=1)\n</function_calls>": "olmo3",
    '<|tools_prefix|>[{"f": {}}]<|tools_suffix|>': "apertus",
    '<dots_function_call>\n<invoke name="f">\n</invoke>\n</dots_function_call>': "dots",
    '<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>': "gemma4",
    "<|channel>thought\nplan<channel|>done": "gemma4",
    '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "f", "parameters": {}}]'
    "<|END_ACTION|>": "cohere_command3",
    "<|START_THINKING|>plan<|END_THINKING|><|START_RESPONSE|>hi": "cohere_command3",
    '<|content_invoke_tool_json|>{"name": "f", "args": {}}<|end_message|>': "inkling",
    "<|content_thinking|>plan<|end_message|><|message_model|><|content_text|>hi": "inkling",
    "<iquest_tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value></iquest_tool_call>":
        "iquest_q1",
    "<think>plan <iquest_tool_call>f": "iquest_q1",
    "<|plamo:begin_tool_requests:plamo|><|plamo:begin_tool_request:plamo|>": "plamo3",
    "<|plamo:begin_think:plamo|>plan<|plamo:end_think:plamo|>done": "plamo3",
    '<function name="f"><param name="a">1</param></function>': "minicpm5",
    "<think>plan <functionname='f'>": "minicpm5",
    '<|open|>tools<|sep|><|open|>call tool="f" index="1"<|sep|>': "kimi_k3",
    "<|open|>think<|sep|>plan<|close|>think<|sep|>done": "kimi_k3",
    "<ifm|tool_calls><ifm|tool_call>f</ifm|tool_call></ifm|tool_calls>": "k2_horizon",
    "<ifm|think_fast>plan</ifm|think_fast>done": "k2_horizon",
    ']<]minimax[>[<tool_call>\n]<]minimax[>[<invoke name="f">]<]minimax[>[</invoke>':
        "minimax_m3",
    "<mm:think>plan</mm:think>done": "minimax_m3",
    'Sure: {"name": "f"} and [f()] and functools[{}]': None,
}

#: the arguments a format's sample call carries once filled in by the benchmark (n = 100)
ITEMS = [{"path": 'src/a"b".py', "lines": [1, 2, 3], "text": "x < y </tool_call>"}]
TEXT = "x" * 100


def files_on_disk() -> dict[str, Path]:
    """Format files by module name, listed from the folder."""
    return {p.stem: p for p in sorted(FORMATS_DIR.glob("*.py"))
            if p.name not in NOT_FORMAT_FILES and not p.name.startswith("_")}


def formats_in(module: str) -> list[str]:
    return [name for name, fmt in FORMATS.items()
            if fmt.parser.__module__ == f"toolmend.parsers.formats.{module}"]


FILES = files_on_disk()
ON_DISK = sorted(name for module in FILES for name in formats_in(module))


def test_the_folder_holds_the_format_files() -> None:
    assert len(FILES) >= 14, sorted(FILES)
    assert "hermes" in FILES and "deepseek" in FILES


@pytest.mark.parametrize("module", sorted(FILES))
def test_every_format_file_is_registered(module: str) -> None:
    names = formats_in(module)
    assert names, f"parsers/formats/{module}.py declares no registered format"
    for name in names:
        fmt = FORMATS[name]
        assert make_parser(name).name == name
        assert isinstance(make_parser(name), MarkerParser)
        assert fmt.sample, f"{name}: no sample call (the benchmarks need one)"


def test_every_registered_format_comes_from_a_file_on_disk() -> None:
    assert sorted(FORMATS) == ON_DISK


@pytest.mark.parametrize("name", ON_DISK)
def test_every_format_is_detected_by_a_model_name(name: str) -> None:
    fmt = FORMATS[name]
    rows = [m for m, f in MODEL_NAMES.items() if f == name]
    if name in ONLY_BY_FLAG:
        assert not fmt.models and not rows
        return
    assert rows, f"{name}: add a model name that picks it to MODEL_NAMES"
    assert fmt.examples, f"{name}: declares no example model names"
    for model in (*rows, *fmt.examples):
        assert format_for_model(model) == name, model


@pytest.mark.parametrize(("model", "expected"), list(MODEL_NAMES.items()))
def test_model_names_pick_their_format(model: str, expected: str | None) -> None:
    assert format_for_model(model) == expected
    assert format_for_model(model.upper()) == expected


def test_no_model_name_no_format() -> None:
    assert format_for_model(None) is None and format_for_model("") is None


def detected(text: str, pieces: list[str] | None = None) -> str | None:
    parser = AutoParser()
    for p in pieces if pieces is not None else [text]:
        parser.feed(p)
    parser.finish()
    return parser.chosen


@pytest.mark.parametrize(("text", "expected"), list(MARKER_TEXTS.items()))
def test_markers_pick_their_format(text: str, expected: str | None) -> None:
    assert detected(text) == expected
    assert detected(text, list(text)) == expected  # one character at a time: the same


@pytest.mark.parametrize("name", ON_DISK)
def test_every_format_with_markers_is_detected_by_them(name: str) -> None:
    fmt = FORMATS[name]
    if fmt.markers or fmt.reasoning_markers:
        assert name in MARKER_TEXTS.values(), f"{name}: add a reply to MARKER_TEXTS"


@pytest.mark.parametrize("name", ON_DISK)
def test_every_format_has_fixtures_that_run(name: str) -> None:
    path = FIXTURES / f"{name}.json"
    assert path.is_file(), f"no fixtures at {path}"
    cases = json.loads(path.read_text())
    assert len(cases) >= 10
    for case in cases:
        assert {"name", "output", "expected"} <= set(case), case.get("name")
    # the parser tests replay them under every split
    assert name in {*test_formats_a.FORMATS, *test_formats_b.FORMATS}, \
        f"{name}: add it to FORMATS (and its markers to MARKERS) in tests/test_formats_b.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import parsers_linear
        yield parsers_linear
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.mark.parametrize("name", ON_DISK)
def test_every_format_is_benchmarked(bench: Any, name: str) -> None:
    assert name in bench.ALL
    # the benchmark's reply is one complete call to `write`, read as such by the parser
    res = run(name, [bench.stream(name, 100)], bench.WRITE_TOOL)
    assert res.content == "" and res.reasoning == ""
    assert [(c.name, c.ended, c.truncated) for c in res.calls] == [("write", True, False)]
    expected = {"text": TEXT} if "$TEXT" in FORMATS[name].sample else {"items": ITEMS}
    assert json.loads(res.calls[0].arguments) == expected


def test_the_mender_watches_each_formats_triggers() -> None:
    assert TRIGGERS["hermes"] == (b"<",)
    assert TRIGGERS["mistral"] == (b"[",)
    assert TRIGGERS["phi4_mini"] == (b"f",)
    assert TRIGGERS["gigachat3"] == (b"<", b"f")
    assert TRIGGERS["llama3_json"] == (b"<", b"{")
    assert TRIGGERS["generic_json"] == (b"{", b"[", b"`")
    assert TRIGGERS["minimax_m3"] == (b"]", b"<")
    assert TRIGGERS["auto"] == (b"<", b"[", b"]")
    assert set(TRIGGERS) == {*FORMATS, "auto"}


def test_doctor_reads_the_vllm_parsers_from_the_declarations() -> None:
    from toolmend.backends.doctor import TOOL_FORMAT_FOR_VLLM_PARSER, VLLM_TOOL_PARSERS

    assert VLLM_TOOL_PARSERS == {
        "hermes": "hermes", "qwen3_coder": "qwen3_coder", "llama3_json": "llama3_json",
        "pythonic": "pythonic", "mistral": "mistral", "deepseek_v3": "deepseek_v3",
        "deepseek_v31": "deepseek_v31", "granite": "granite", "glm45": "glm45",
        "kimi_k2": "kimi_k2", "gpt_oss": "openai", "phi4_mini": "phi4_mini_json",
        "minimax_m2": "minimax_m2", "functiongemma": "functiongemma",
        "deepseek_v32": "deepseek_v32",
        "seed_oss": "seed_oss",
        "longcat": "longcat",
        "ernie45": "ernie45",
        "olmo3": "olmo3",
        "xlam": "xlam",
        "gigachat3": "gigachat3",
        "hunyuan": "hunyuan_a13b",
        "jamba": "jamba",
        "step3": "step3",
        "internlm": "internlm",
        "lfm2": "lfm2",
        "granite_20b_fc": "granite-20b-fc",
        "apertus": "apertus",
        "dots": "dots",
        "gemma4": "gemma4",
        "cohere_command3": "cohere_command3",
        "cohere_command4": "cohere_command4",
        "inkling": "inkling",
        "plamo3": "plamo3",
        "minicpm5": "minicpm5",
        "kimi_k3": "kimi_k3",
        "k2_horizon": "k2_horizon",
        "minimax_m3": "minimax_m3",
        "muse_glimmer": "muse_glimmer"}
    assert TOOL_FORMAT_FOR_VLLM_PARSER["llama4_pythonic"] == "pythonic"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["llama4_json"] == "llama3_json"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["qwen3_xml"] == "qwen3_coder"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["step3p5"] == "qwen3_coder"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["mimo"] == "qwen3_coder"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["glm47"] == "glm45"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["ling3"] == "glm45"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["poolside_v1"] == "glm45"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["qwen3_json"] == "hermes"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["openai"] == "gpt_oss"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["deepseek_v4"] == "deepseek_v32"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["deepseek_v41"] == "deepseek_v32"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["hy_v3"] == "hunyuan"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["hy_v4"] == "hunyuan"
    assert TOOL_FORMAT_FOR_VLLM_PARSER["granite4"] == "hermes"
    assert len(TOOL_FORMAT_FOR_VLLM_PARSER) == 53


# --- bad declarations ----------------------------------------------------------------------------

class _Parser(MarkerParser):
    name = "demo"

    def feed(self, text: str) -> list[Any]:
        return []

    def finish(self) -> list[Any]:
        return []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "other"}, "its parser _Parser is named 'demo'"),
    ({"models": ("qwen(",)}, "model pattern 'qwen('"),
    ({"triggers": (b"<|",)}, "triggers must be single bytes"),
    ({"marker_follows": ("{",)}, "marker_follows without markers"),
    ({"sample": "<call>write</call>"}, "the sample needs exactly one of"),
    ({"sample": "$ARGS $TEXT"}, "the sample needs exactly one of"),
])
def test_a_bad_declaration_is_a_clear_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("|", r"\|")):
        ToolFormat(**{"name": "demo", "parser": _Parser, **kwargs})


def _fmt(name: str, **kw: Any) -> ToolFormat:
    cls = type(f"P_{name}", (_Parser,), {"name": name})
    return ToolFormat(name=name, parser=cls, **kw)


def test_a_shared_marker_needs_one_format_taking_the_rest() -> None:
    with pytest.raises(ValueError, match="exactly one of them must leave marker_follows empty"):
        shared_marker("<x>", [_fmt("a", markers=("<x>",)), _fmt("b", markers=("<x>",))])
    with pytest.raises(ValueError, match="exactly one of them must leave marker_follows empty"):
        shared_marker("<x>", [_fmt("a", markers=("<x>",), marker_follows=("{",)),
                              _fmt("b", markers=("<x>",), marker_follows=("[",))])
    with pytest.raises(ValueError, match="'a' and 'b' both claim what starts with '<f'"):
        shared_marker("<x>", [_fmt("a", markers=("<x>",), marker_follows=("<f",)),
                              _fmt("b", markers=("<x>",), marker_follows=("<fun",)),
                              _fmt("c", markers=("<x>",))])


def test_a_shared_marker_is_decided_by_what_follows() -> None:
    rule = shared_marker("<x>", [_fmt("a", markers=("<x>",), marker_follows=("{", "")),
                                 _fmt("b", markers=("<x>",), marker_follows=("<fn=",)),
                                 _fmt("c", markers=("<x>",))])
    assert rule.decide("", final=True) == "a"
    assert rule.decide("{}", final=False) == "a"
    assert rule.decide("<fn=g>", final=False) == "b"
    assert rule.decide("<f", final=False) is None  # could still be <fn=
    assert rule.decide("<f", final=True) == "c"
    assert rule.decide("name", final=False) == "c"


def test_a_reasoning_marker_cannot_also_be_a_start_marker() -> None:
    with pytest.raises(ValueError, match=r"reasoning marker '\[T\]' of 'b' is also a marker"):
        start_markers([_fmt("a", markers=("[T]",)), _fmt("b", reasoning_markers=("[T]",))])
    start, shared = start_markers([_fmt("a", markers=("[A]",)),
                                   _fmt("b", reasoning_markers=("[T]",))])
    assert start == {"[A]": "a", "[T]": "b"} and shared == {}


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty package of format files on ``sys.path``: the registry's walk pointed at it."""
    pkg = tmp_path / "fake_formats"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for mod in [m for m in sys.modules if m == "fake_formats" or m.startswith("fake_formats.")]:
        del sys.modules[mod]


def _format_file(name: str, rank: int = 10, decl: str = "FORMAT") -> str:
    return textwrap.dedent(f"""
        from toolmend.parsers.formats import ToolFormat
        from toolmend.parsers.formats.base import MarkerParser

        class P(MarkerParser):
            name = "{name}"
            def feed(self, text): return []
            def finish(self): return []

        {decl} = ToolFormat(name="{name}", parser=P, models=("{name}",), rank={rank})
        """)


def test_the_walk_finds_every_declaration(package: Path) -> None:
    (package / "one.py").write_text(_format_file("one"))
    (package / "two.py").write_text(_format_file("two", rank=20, decl="ANY_NAME"))
    (package / "_helper.py").write_text("X = 1\n")
    assert sorted(collect("fake_formats")) == ["one", "two"]


def test_a_file_without_a_declaration_is_a_clear_error(package: Path) -> None:
    (package / "one.py").write_text(_format_file("one"))
    (package / "helper.py").write_text("X = 1\n")
    with pytest.raises(LookupError, match=r"format file helper\.py declares no ToolFormat"):
        collect("fake_formats")


def test_two_declarations_of_one_name_are_a_clear_error(package: Path) -> None:
    (package / "one.py").write_text(_format_file("same"))
    (package / "two.py").write_text(_format_file("same", rank=20))
    with pytest.raises(ValueError, match="tool format 'same' is declared twice"):
        collect("fake_formats")


def test_two_formats_of_one_rank_are_a_clear_error(package: Path) -> None:
    (package / "one.py").write_text(_format_file("one"))
    (package / "two.py").write_text(_format_file("two"))
    with pytest.raises(ValueError, match="'one' and 'two' share the model-pattern rank 10"):
        collect("fake_formats")


def test_an_unknown_format_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown tool format 'nope'; one of \[.*"
                                         r"'deepseek_v3'.*'hermes'.*\]"):
        make_parser("nope")
