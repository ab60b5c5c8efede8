"""Granite, GLM-4.5, Kimi K2, gpt-oss, FunctionGemma, Phi-4-mini, MiniMax-M2, the generic JSON
fallback and the families added after them (DeepSeek's DSML, ...): every fixture's expected
result, split invariance, and arbitrary input."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.formats import make_parser

from .format_harness import check_expected, check_split_invariance, load_cases, options, run

FORMATS = ["granite", "glm45", "kimi_k2", "gpt_oss", "functiongemma", "phi4_mini", "minimax_m2",
           "generic_json", "deepseek_v32", "seed_oss", "longcat", "ernie45", "olmo3", "xlam",
           "gigachat3", "gigachat35", "hunyuan", "jamba", "step3", "internlm", "lfm2",
           "granite_20b_fc", "apertus", "dots", "gemma4", "cohere_command3", "cohere_command4",
           "inkling",
           "iquest_q1", "plamo3", "minicpm5", "kimi_k3",
           "k2_horizon", "minimax_m3", "muse_glimmer"]

_COHERE = ["<|START_ACTION|>", "<|END_ACTION|>", "<|START_THINKING|>", "<|END_THINKING|>",
           "<|START_RESPONSE|>", "<|END_TEXT|>", "[", "]", ",",
           '{"tool_call_id": "0", "tool_name": "echo", ', '"parameters": {"text": "', '"}}', "\n"]

# marker fragments per format, for the arbitrary-input property test
MARKERS: dict[str, list[str]] = {
    "granite": ["<|tool_call|>", "<tool_call>", "</tool_call>", "[", "]", "{", "}",
                '{"name": "echo", "arguments": ', '"'],
    "glm45": ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
              "<arg_value>", "</arg_value>", "echo\n", "text", "\n"],
    "kimi_k2": ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
                "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
                "functions.echo:0", "<think>", "</think>", '{"text": "', '"', "}"],
    "gpt_oss": ["<|start|>", "assistant", "<|channel|>", "analysis", "final", "commentary",
                " to=functions.echo ", "<|constrain|>", "json", "<|message|>", "<|end|>",
                "<|call|>", "<|return|>", '{"text": "', '"', "}"],
    "functiongemma": ["<start_function_call>", "<end_function_call>", "<escape>", "call:echo",
                      "{", "}", "[", "]", ":", ",", "text", "True"],
    "phi4_mini": ["functools[", "functools", "{", "}", "]", '{"name": "echo", "arguments": ',
                  '"', ","],
    "minimax_m2": ["<minimax:tool_call>", "</minimax:tool_call>", '<invoke name="echo">',
                   "</invoke>", '<parameter name="text">', "</parameter>", "<think>", "</think>",
                   "\n"],
    "generic_json": ["```", "```json\n", "{", "}", "[", "]", '"name": "echo"', '"arguments": ',
                     '"', ",", " "],
    "deepseek_v32": ["<｜DSML｜function_calls>", "</｜DSML｜function_calls>",
                     "<｜DSML｜tool_calls>", '<｜DSML｜invoke name="echo">',
                     '<｜DSML｜ invoke name="echo"', "</｜DSML｜invoke>",
                     '<｜DSML｜parameter name="text" string="true">',
                     '<｜DSML｜parameter name="n" string="false">', "</｜DSML｜parameter>", "/>",
                     "<think>", "</think>", "{", "}", '"', "<｜end▁of▁sentence｜>", "\n"],
    "seed_oss": ["<seed:think>", "</seed:think>", "<seed:tool_call>", "</seed:tool_call>",
                 "<function=echo>", "</function>", "<parameter=text>", "<parameter=n>",
                 "</parameter>", "<seed:eos>", "<tool_call>", "\n",
                 '{"name": "echo", "arguments": {}}'],
    "longcat": ["<longcat_think>", "</longcat_think>", "<longcat_tool_call>",
                "</longcat_tool_call>", '{"name": "echo", ', '"arguments": {"text": "', '"}}',
                "<tool_call>", "\n", " "],
    "ernie45": ["<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>",
                '{"name": "echo", ', '"arguments": {"text": "', '"}}', "\n", " "],
    "olmo3": ["<function_calls>", "</function_calls>", "echo(", "text=", "n=", '"x"', "'y'",
              "null", "true", ")", ",", "\n", "(", "[", "]", "<think>", "</think>", '"""'],
    "xlam": ["[", "]", "{", "}", ",", '"', '{"name": "echo", ', '"arguments": ', '"text": ',
             "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "```", "```json\n", "<think>",
             "</think>", " ", "\n", "Sure"],
    "gigachat3": ["function call<|role_sep|>", "function call", "<|role_sep|>",
                  "<|function_call|>", "<|message_sep|>", "</s>", '{"name": "echo", ',
                  '"arguments": {"text": "', '"}}', "\n", " "],
    "gigachat35": ["<｜GCML｜tool_calls>", "</｜GCML｜tool_calls>", '<｜GCML｜invoke name="echo">',
                   "</｜GCML｜invoke>", '<｜GCML｜parameter name="text" string="true">',
                   '<｜GCML｜parameter name="n" string="false">', "</｜GCML｜parameter>",
                   "<|message_sep|>", "{", "}", "\n"],
    "hunyuan": ["<tool_calls>", "</tool_calls>", "<tool_calls:x>", "</tool_calls:x>",
                "<tool_call>", "</tool_call>", "<tool_sep>", "<arg_key>", "</arg_key>",
                "<arg_value>", "</arg_value>", "echo", "text", "[", "]",
                '{"name": "echo", "arguments": {}}', "<think>", "</think>", "<answer>", ":",
                "\n"],
    "jamba": ["<tool_calls>", "</tool_calls>", "[", "]", '{"name": "echo", ',
              '"arguments": {"text": "', '"}}', ",", "\n", " "],
    "step3": ["<｜tool_calls_begin｜>", "<｜tool_calls_end｜>", "<｜tool_call_begin｜>",
              "<｜tool_call_end｜>", "<｜tool_sep｜>", "function", '<steptml:invoke name="echo">',
              "</steptml:invoke>", '<steptml:parameter name="text">',
              '<steptml:parameter name="n">', "</steptml:parameter>", "<think>", "</think>",
              "\n"],
    "internlm": ["<|action_start|>", "<|plugin|>", "<|action_start|><|plugin|>", "<|action_end|>",
                 "<|interpreter|>", '{"name": "echo", ', '"parameters": {"text": "', '"}}',
                 "<think>", "</think>", "\n", " "],
    "lfm2": ["<|tool_call_start|>", "<|tool_call_end|>", "[", "]", "echo(", "text=", '"x"',
             "null", ")", ",", '{"name": "echo", "arguments": {}}', "<think>", "</think>", "\n",
             " "],
    "granite_20b_fc": ["<function_call>", "<function_calls>", '{"name": "echo", ',
                       '"arguments": {"text": "', '"}}', "{", "}", "\n", " "],
    "apertus": ["<|tools_prefix|>", "<|tools_suffix|>", "[", "]", '{"echo": ', '{"text": "',
                '"}}', "{", "}", ",", '{"name": "echo", "arguments": {}}', "\n", " "],
    "dots": ["<dots_function_call>", "</dots_function_call>", '<invoke name="echo">',
             "</invoke>", '<parameter name="text">', '<parameter name="n">', "</parameter>",
             '{"name": "echo", "arguments": {"text": "', '"}}', "<think>", "</think>", "\n"],
    "gemma4": ["<|tool_call>", "<tool_call|>", "call:echo", ":echo", "{", "}", "[", "]", ":",
               ",", "text", '<|"|>', "<|channel>", "<|channel>thought\n", "<channel|>", "true",
               "\n"],
    "cohere_command3": _COHERE,
    "cohere_command4": _COHERE,
    "inkling": ["<|message_model|>", "<|content_text|>", "<|content_thinking|>",
                "<|content_invoke_tool_json|>", "<|content_invoke_tool_text|>",
                "<|content_model_end_sampling|>", "<|end_message|>", "echo",
                '{"name": "echo", ', '"args": {"text": "', '"}}', "\n", " "],
    "iquest_q1": ["<iquest_tool_call>", "</iquest_tool_call>", "<arg_key>", "</arg_key>",
                  "<arg_value>", "</arg_value>", "echo", "text", "n", "\n", "<think>", "</think>",
                  "<tool_call>"],
    "plamo3": ["<|plamo:begin_tool_requests:plamo|>", "<|plamo:end_tool_requests:plamo|>",
               "<|plamo:begin_tool_request:plamo|>", "<|plamo:end_tool_request:plamo|>",
               "<|plamo:begin_tool_name:plamo|>", "<|plamo:end_tool_name:plamo|>",
               "<|plamo:begin_tool_arguments:plamo|>", "<|plamo:constrain|>json<|plamo:msg|>",
               "<|plamo:end_tool_arguments:plamo|>", "<|plamo:begin_think:plamo|>",
               "<|plamo:end_think:plamo|>", "<|plamo:tag|>", "echo", '{"text": "', '"}', "\n"],
    "minicpm5": ['<function name="echo">', "<function name=", "<functionname='echo'>",
                 "</function>", '<param name="text">', "<param name=n>", "<paramname=", "</param>",
                 "<arguments>", "</arguments>", "<![CDATA[", "]]>", "&amp;", "&lt", "<think>",
                 "</think>", "\n", " ", "3", "x"],
    "kimi_k3": ["<|open|>", "<|close|>", "<|sep|>", "tools", "call", "argument", "think",
                "response", "message", " ", '<|open|>call tool="echo" index="1"<|sep|>',
                '<|open|>argument key="text" type="string"<|sep|>', ' type="integer"',
                "<|close|>argument<|sep|>", "<|close|>call<|sep|>", "<|open|>tools<|sep|>",
                "<|close|>tools<|sep|>", "<|open|>think<|sep|>", "<|close|>think<|sep|>", "1"],
    "k2_horizon": ["<ifm|tool_calls>", "</ifm|tool_calls>", "<ifm|tool_call>", "</ifm|tool_call>",
                   "<ifm|arg_key>", "</ifm|arg_key>", "<ifm|arg_type>", "</ifm|arg_type>",
                   "<ifm|arg_value>", "</ifm|arg_value>", "<ifm|think>", "</ifm|think>",
                   "<ifm|think_fast>", "</ifm|think_fast>", "echo", "text", "integer",
                   '{"name": "echo", "arguments": {}}', "\n", " "],
    "minimax_m3": ["]<]minimax[>[", "]<]minimax[>[<tool_call>", "]<]minimax[>[</tool_call>",
                   ']<]minimax[>[<invoke name="echo">', "]<]minimax[>[<invoke name=",
                   "]<]minimax[>[</invoke>", "]<]minimax[>[<text>", "]<]minimax[>[</text>",
                   "]<]minimax[>[<n>", "]<]minimax[>[</n>", "<text>", "<mm:think>",
                   "</mm:think>", "\n", " ", "3", "x"],
    "muse_glimmer": ["<|start|>", "assistant", " to=self", " to=user", " to=echo.echo", "to=",
                     "<|message|>", "<|eom|>", "<|eot|>", "<atem:function_calls>",
                     "</atem:function_calls>", '<atem:invoke name="echo.echo">', "<atem:invoke",
                     "</atem:invoke>", '<atem:parameter name="text">', "</atem:parameter>", ">",
                     "\n", " ", "x"],
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}}}},
]

CASES = [(fmt, case) for fmt in FORMATS for case in load_cases(fmt)]


def test_every_format_has_ten_cases() -> None:
    for fmt in FORMATS:
        assert len(load_cases(fmt)) >= 10, fmt


@pytest.mark.parametrize(("fmt", "case"), CASES, ids=[f"{f}-{c['name']}" for f, c in CASES])
def test_fixture(fmt: str, case: dict[str, Any]) -> None:
    tools = case.get("tools")
    check_expected(run(fmt, [case["output"]], tools, **options(case)), case["expected"])
    n_random = 500 if len(case["output"]) <= 150 else 100
    res = check_split_invariance(fmt, case["output"], tools, seed=len(case["output"]),
                                 n_random=n_random, **options(case))
    check_expected(res, case["expected"])


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) \
        if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _text_strategy(fmt: str) -> st.SearchStrategy[str]:
    atom = st.one_of(st.sampled_from(MARKERS[fmt]), st.text(max_size=6),
                     st.sampled_from([m[: len(m) // 2] for m in MARKERS[fmt]]))
    return st.lists(atom, max_size=25).map("".join)


@pytest.mark.parametrize("fmt", FORMATS)
def test_arbitrary_input_never_raises_and_is_split_invariant(fmt: str) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=_text_strategy(fmt), seed=st.integers(0, 2**32 - 1))
    def prop(text: str, seed: int) -> None:
        whole = run(fmt, [text], TOOLS)
        assert run(fmt, _pieces(text, random.Random(seed)), TOOLS).key() == whole.key()
        assert run(fmt, list(text), TOOLS).key() == whole.key()

    prop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_text_streams_without_delay(fmt: str) -> None:
    parser = make_parser(fmt, TOOLS)
    events = parser.feed("Hello, world. ")
    assert "".join(e.text for e in events if hasattr(e, "text")) == "Hello, world. "
