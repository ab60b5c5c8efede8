"""Reasoning as part of a reply: the decision table ("a call counts when the model meant it"),
replies opened inside reasoning, the fields reasoning reaches the client in, the re-split of a
server's own reasoning field, and split invariance across every reasoning boundary.

Expected results are written out literally. The format-level rows of the table are fixtures
(``fixtures/formats/*.json``, names starting with ``table_``); here the same rows go through the
whole mender, in buffered and incremental mode, one character per delta.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.autodetect import AutoParser
from toolmend.parsers.formats import make_parser
from toolmend.parsers.mender import ChatMender, feed_whole, mend_message
from toolmend.parsers.reasoning import ReasoningSignals, field_for, template_switch
from toolmend.parsers.sse import SSEComment, SSEDecoder, SSEEvent
from toolmend.parsers.stream import StreamPipeline

from .format_harness import run

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}},
]
X = '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
Y = '<tool_call>{"name": "get_weather", "arguments": {"city": "Bergen"}}</tool_call>'
BERGEN = ("get_weather", {"city": "Bergen"})
UTC = ("get_time", {"tz": "UTC"})


def view(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client accumulates: every string field of the deltas concatenated per key, the
    calls as (name, arguments), the finish reason."""
    fields: dict[str, str] = {}
    calls: dict[int, list[Any]] = {}
    finish = None
    for c in chunks:
        for ch in c.get("choices") or ():
            for key, value in (ch.get("delta") or {}).items():
                if key == "tool_calls":
                    for tc in value:
                        slot = calls.setdefault(tc["index"], ["", ""])
                        slot[0] += tc["function"].get("name") or ""
                        slot[1] += tc["function"].get("arguments") or ""
                elif isinstance(value, str) and value and key != "role":
                    fields[key] = fields.get(key, "") + value
            finish = ch.get("finish_reason") or finish
    return {**fields, "calls": [(n, orjson.loads(a)) for n, a in
                                (calls[i] for i in sorted(calls))], "finish": finish}


def mend(deltas: list[dict[str, Any]], finish: str = "stop", **kw: Any
         ) -> tuple[dict[str, Any], list[str], list[list[dict[str, Any]]]]:
    """Feed deltas to a hermes mender; the client view, the notes, and the chunks each feed
    emitted (the last entry: the finish chunk's)."""
    m = ChatMender(kw.pop("fmt", "hermes"), TOOLS, **kw)
    per_feed: list[list[dict[str, Any]]] = []
    notes: list[str] = []
    for d in deltas:
        out, n = m.feed({"model": "m", "choices": [{"index": 0, "delta": d}]})
        per_feed.append(out)
        notes += n
    out, n = m.feed({"model": "m", "choices": [{"index": 0, "delta": {},
                                                "finish_reason": finish}]})
    per_feed.append(out)
    notes += n
    return view([c for f in per_feed for c in f]), notes, per_feed


def chars(text: str) -> list[dict[str, Any]]:
    return [{"content": c} for c in text]


# --- the decision table ------------------------------------------------------------------------

TABLE = orjson.loads((Path(__file__).resolve().parent.parent / "fixtures" / "reasoning" /
                      "decision_table.json").read_bytes())


def table_row(case: dict[str, Any]) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """A table case as one-character deltas (the server's reasoning field as vLLM names it),
    its finish reason, and the client's expected view."""
    sc, exp = case["scenario"], case["expected"]
    deltas = [{"reasoning": c} for c in sc.get("reasoning", "")] + chars(sc.get("content", ""))
    view_: dict[str, Any] = {}
    if exp.get("reasoning"):
        view_["reasoning_content"] = exp["reasoning"]
    if exp.get("server_reasoning"):
        view_["reasoning"] = exp["server_reasoning"]
    if exp.get("content"):
        view_["content"] = exp["content"]
    view_["calls"] = [(c["name"], c["arguments"]) for c in exp["tool_calls"]]
    view_["finish"] = exp["finish_reason"]
    return deltas, sc.get("finish_reason", "stop"), view_


@pytest.mark.parametrize("mode", ["buffered", "incremental"])
@pytest.mark.parametrize("case", TABLE, ids=[c["name"] for c in TABLE])
def test_decision_table_through_the_mender(case: dict[str, Any], mode: str) -> None:
    deltas, finish, expected = table_row(case)
    got, _, _ = mend(deltas, finish, mode=mode)
    assert got == expected


def test_the_table_fixture_is_the_readme_table() -> None:
    """Every row of the README's table has its cases (the fifth row's two finish reasons are
    two), in the README's order."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    at = readme.index("| reply | calls the agent gets | where the drafted call's text goes |")
    rows = list(itertools.takewhile(lambda line: line.startswith("| "),
                                    readme[at:].splitlines()[2:]))
    assert len(rows) == 6
    cells = [row.split(" | ")[0].removeprefix("| ").replace("`", "").split(" (")[0]
             for row in rows]
    cases = [c["row"].split(" (")[0] for c in TABLE]
    assert cases == [cells[0], cells[1], cells[2], cells[3], cells[4], cells[4], cells[5]]


@pytest.mark.parametrize("mode", ["buffered", "incremental"])
def test_a_call_inside_reasoning_is_held_until_the_reply_ends(mode: str) -> None:
    """Rows 3 and 4: the call fires, but only once the reply has ended; nothing of it goes
    out while the model could still go on reasoning."""
    for text in (f"<think>Bergen, then. {Y}", f"<think>Bergen, then. {Y}\n</think>\n"):
        _, _, per_feed = mend(chars(text), "stop", mode=mode)
        early = [c for f in per_feed[:-1] for c in f
                 if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
        assert early == []
        assert view(per_feed[-1])["calls"] == [BERGEN]


@pytest.mark.parametrize("mode", ["buffered", "incremental"])
def test_a_drafted_call_that_is_cut_off_by_max_tokens_never_fires(mode: str) -> None:
    got, notes, _ = mend(chars(f"<think>Bergen, then. {Y}"), "length", mode=mode)
    assert got == {"reasoning_content": f"Bergen, then. {Y}", "calls": [], "finish": "length"}
    assert any("drafted inside reasoning" in n for n in notes)


def test_two_calls_as_the_final_act_both_fire_in_order() -> None:
    got, _, _ = mend(chars(f"<think>Both. {X}\n{Y}</think>"))
    assert got == {"reasoning_content": "Both. \n", "calls": [UTC, BERGEN],
                   "finish": "tool_calls"}


def test_a_rejected_draft_gives_its_index_to_the_real_call() -> None:
    m = ChatMender("hermes", TOOLS)
    out = m.feed({"choices": [{"index": 0, "delta": {
        "content": f"<think>{X} no</think>{Y}{Y.replace('Bergen', 'Oslo')}"},
        "finish_reason": "stop"}]})[0]
    indexes = [tc["index"] for c in out for tc in c["choices"][0]["delta"].get("tool_calls", ())
               if "id" in tc]
    assert indexes == [0, 1]


# --- reasoning opened by the chat template ----------------------------------------------------

def test_reply_opened_inside_reasoning_is_split_at_the_end_marker() -> None:
    got, _, _ = mend(chars(f"I could call {X} but no.</think>\n\n{Y}"), reasoning_open=True)
    assert got == {"reasoning_content": f"I could call {X} but no.", "content": "\n\n",
                   "calls": [BERGEN], "finish": "tool_calls"}
    assert "</think>" not in got.get("content", "")


def test_reply_opened_that_never_closes_stays_reasoning_and_says_so() -> None:
    got, notes, _ = mend(chars("Still weighing <b>both</b> options"), reasoning_open=True)
    assert got == {"reasoning_content": "Still weighing <b>both</b> options", "calls": [],
                   "finish": "stop"}
    assert notes == ["the reply ended inside reasoning (taken to start there: reasoning_open); "
                     "it never closed it, so all of its text after the start went to reasoning"]


def test_model_name_from_the_upstream_opens_reasoning() -> None:
    m = ChatMender(None, TOOLS)
    out = m.feed({"model": "Qwen/Qwen3-30B-A3B-Thinking-2507", "choices": [
        {"index": 0, "delta": {"content": "Sunny?</think>It is sunny."}}]})[0]
    out += m.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})[0]
    assert m.opens_reasoning and m.open_signal == "model name"
    assert view(out) == {"reasoning_content": "Sunny?", "content": "It is sunny.", "calls": [],
                         "finish": "stop"}


def test_a_server_that_split_reasoning_itself_is_not_opened_again() -> None:
    """The model name says the template opens reasoning, but the server already sent its own
    reasoning field: its content is the answer."""
    got, _, _ = mend([{"reasoning": "Sunny?"}, {"content": "It is sunny."}],
                     reasoning_open=True)
    assert got == {"reasoning": "Sunny?", "content": "It is sunny.", "calls": [],
                   "finish": "stop"}


def test_stray_end_marker_is_removed_from_streamed_content_with_a_note() -> None:
    got, notes, _ = mend(chars("The user wants weather.</think>It is sunny."))
    assert got == {"content": "The user wants weather.It is sunny.", "calls": [],
                   "finish": "stop"}
    assert notes == ["dropped 1 reasoning end marker(s) that closed no reasoning; the text "
                     "before was already sent as content (the chat template probably opened "
                     "reasoning: see reasoning_open_models)"]


def test_stray_end_marker_after_a_streamed_call_says_the_call_was_sent() -> None:
    """Not guessed open, streamed: a call before the marker has gone out by the time the
    marker shows it was written inside reasoning; the note says so, for the operator to set
    the model's reasoning_open_models."""
    got, notes, _ = mend(chars(f"Maybe {X}</think>Hi."))
    assert got["calls"] == [UTC]
    assert notes[0] == ("dropped 1 reasoning end marker(s) that closed no reasoning; the text "
                        "before was already sent as content, and 1 tool call(s) written before "
                        "it were already emitted (the chat template probably opened reasoning: "
                        "see reasoning_open_models)")


def test_stray_end_marker_in_a_whole_reply_makes_the_text_before_it_reasoning() -> None:
    """Not streamed, nothing has gone out yet: the reply is read as opened from its start, so
    the call drafted before the marker does not fire either."""
    msg, finish, _ = mend_message(
        {"role": "assistant", "content": f"I could call {X} but no.</think>{Y}"}, "stop",
        "hermes", TOOLS)
    assert msg["reasoning_content"] == f"I could call {X} but no."
    assert msg["content"] is None
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"]))
            for c in msg["tool_calls"]] == [BERGEN]
    assert finish == "tool_calls"


def test_signals_in_order_of_precedence() -> None:
    thinking = "Qwen3-4B-Thinking-2507"
    assert ReasoningSignals().decide(thinking) == (True, "model name")
    assert ReasoningSignals(request=False).decide(thinking) == (True, "model name")
    assert ReasoningSignals(request=False).decide("Qwen3.5-27B") == (False,
                                                                     "chat_template_kwargs")
    assert ReasoningSignals().decide("Qwen3.5-27B") == (True, "model name")
    assert ReasoningSignals(request=True).decide("qwen3-8b") == (True, "chat_template_kwargs")
    assert ReasoningSignals().decide("qwen3-8b") == (False, "")
    assert ReasoningSignals(closed_models=("*thinking*",)).decide(thinking) == (
        False, "reasoning_closed_models")
    assert ReasoningSignals(request=False, open_models=("my-*",)).decide("My-Model") == (
        True, "reasoning_open_models")
    for name in ("deepseek-ai/DeepSeek-R1-0528", "DeepSeek-R1-Distill-Qwen-7B", "Qwen/QwQ-32B",
                 "MiniMaxAI/MiniMax-M2", "baidu/ERNIE-4.5-21B-A3B-Thinking", "stepfun-ai/step3",
                 "stepfun-ai/Step-3.5-Flash", "CohereLabs/command-a-plus"):
        assert ReasoningSignals(request=False).decide(name)[0], name
    assert ReasoningSignals().decide(None, "deepseek-r1") == (True, "model name")
    assert ReasoningSignals().decide("baidu/ERNIE-4.5-21B-A3B-PT") == (False, "")
    assert ReasoningSignals().decide("CohereLabs/command-a-reasoning-08-2025") == (False, "")


def test_template_switch_and_field_choice() -> None:
    assert template_switch({"enable_thinking": False}) is False
    assert template_switch({"thinking": True}) is True
    assert template_switch({"enable_thinking": "yes"}) is None
    assert template_switch(None) is None
    assert field_for("Reasoning", "reasoning_content") == "reasoning"
    assert field_for("nonsense", "drop") == "drop"
    assert field_for(None, "content") == "content"


# --- the fields reasoning reaches the client in -----------------------------------------------

TEXT = "<think>Let me see.</think>Sunny."


@pytest.mark.parametrize(("field", "expected"), [
    ("reasoning_content", {"reasoning_content": "Let me see.", "content": "Sunny."}),
    ("reasoning", {"reasoning": "Let me see.", "content": "Sunny."}),
    ("drop", {"content": "Sunny."}),
    ("content", {"content": "<think>Let me see.</think>Sunny."}),
])
def test_separated_reasoning_goes_to_the_chosen_field(field: str,
                                                      expected: dict[str, Any]) -> None:
    got, _, _ = mend(chars(TEXT), reasoning_field=field)
    assert got == {**expected, "calls": [], "finish": "stop"}
    msg, _, _ = mend_message({"role": "assistant", "content": TEXT}, "stop", "hermes", TOOLS,
                             reasoning_field=field)
    assert {k: v for k, v in msg.items() if k != "role"} == {"content": "Sunny.", **expected}


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "drop", "content"])
@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
def test_server_reasoning_field_passes_through_unchanged(key: str, field: str) -> None:
    got, _, _ = mend([{key: "Think <tool_call>"}, {key: " more."}, {"content": "Done."}],
                     reasoning_field=field)
    assert got == {key: "Think <tool_call> more.", "content": "Done.", "calls": [],
                   "finish": "stop"}
    msg, _, _ = mend_message({"role": "assistant", key: "Think <tool_call> more.",
                              "content": "Done."}, "stop", "hermes", TOOLS, reasoning_field=field)
    assert msg == {"role": "assistant", key: "Think <tool_call> more.", "content": "Done."}


def test_content_field_wraps_reasoning_that_never_closed() -> None:
    got, _, _ = mend(chars("<think>Hmm"), reasoning_field="content")
    assert got == {"content": "<think>Hmm</think>", "calls": [], "finish": "stop"}


# --- re-splitting a server's own reasoning field ----------------------------------------------

VLLM_DRAFT = [{"reasoning": "I could call "},
              {"content": X}, {"content": " but no.</think>"}, {"content": Y}]


@pytest.mark.parametrize("mode", ["buffered", "incremental"])
@pytest.mark.parametrize(("deltas", "expected"), [
    # vLLM's qwen3 parser ended reasoning at the drafted call; the end marker is in content
    (VLLM_DRAFT, {"reasoning": f"I could call {X} but no.", "calls": [BERGEN],
                  "finish": "tool_calls"}),
    # ... or dropped
    ([{"reasoning": "I could call "}, {"content": f"{X} but no.{Y}"}],
     {"reasoning": f"I could call {X} but no.", "calls": [BERGEN],
      "finish": "tool_calls"}),
    # the server ended reasoning at the model's own end marker (dropped): content follows
    ([{"reasoning": "Sunny?"}, {"content": "\n\nIt is sunny."}],
     {"reasoning": "Sunny?", "content": "\n\nIt is sunny.", "calls": [],
      "finish": "stop"}),
    # ... or a call follows it, after whitespace (Qwen3 writes "</think>\n\n"): the server
    # cut the reasoning at a call only when the content starts with the call's opener
    ([{"reasoning_content": "Bergen."}, {"content": f"\n\n{Y}"}],
     {"reasoning_content": "Bergen.", "content": "\n\n", "calls": [BERGEN],
      "finish": "tool_calls"}),
    # ... and with text after the call, the call still counts
    ([{"reasoning": "Bergen."}, {"content": f"\n\n{Y}\nDone."}],
     {"reasoning": "Bergen.", "content": "\n\n\nDone.", "calls": [BERGEN],
      "finish": "tool_calls"}),
    # no content at all: the whole reply was reasoning
    ([{"reasoning": "Just "}, {"reasoning": "thinking."}],
     {"reasoning": "Just thinking.", "calls": [], "finish": "stop"}),
], ids=["end-marker-in-content", "end-marker-dropped", "answer", "call", "call-then-text",
        "only-reasoning"])
@pytest.mark.parametrize("fmt", ["hermes", "auto"])
def test_resplit_server_reasoning(deltas: list[dict[str, Any]], expected: dict[str, Any],
                                  mode: str, fmt: str) -> None:
    got, _, _ = mend(deltas, resplit_server_reasoning=True, mode=mode, fmt=fmt)
    assert got == expected


def test_resplit_non_streaming_message() -> None:
    m = ChatMender("hermes", TOOLS, resplit_server_reasoning=True, reasoning_field="reasoning")
    chunks, _ = feed_whole(m, {"role": "assistant", "reasoning": "I could call ",
                               "content": f"{X} but no.</think>{Y}"}, "stop", "m")
    assert view(chunks) == {"reasoning": f"I could call {X} but no.", "calls": [BERGEN],
                            "finish": "tool_calls"}


def sse(deltas: list[dict[str, Any]], finish: str = "stop", model: str = "m") -> bytes:
    chunks = [{"id": "c", "object": "chat.completion.chunk", "model": model,
               "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"id": "c", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def client(pieces: list[bytes], **kw: Any) -> tuple[dict[str, Any], list[str]]:
    """The pipeline's output for upstream bytes cut into ``pieces``: the client view and the
    SSE comments."""
    p = StreamPipeline(False, ChatMender(kw.pop("fmt", "hermes"), TOOLS, **kw))
    out = b"".join(p.feed(x) for x in pieces) + p.finish()
    dec = SSEDecoder()
    evs = dec.feed(out) + dec.finish()
    data = [e for e in evs if isinstance(e, SSEEvent)]
    assert data[-1].is_done
    comments = [e.text.decode() for e in evs if isinstance(e, SSEComment)]
    return view([orjson.loads(e.data) for e in data[:-1]]), comments


def byte_splits(raw: bytes, rng: random.Random, n: int = 60) -> list[list[bytes]]:
    out = [[raw[i:i + 1] for i in range(len(raw))]]
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 30)))
        out.append([raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)])
    return out


def test_resplit_stream_split_at_every_byte() -> None:
    raw = sse([{"role": "assistant", "content": ""}, *VLLM_DRAFT])
    whole, _ = client([raw], resplit_server_reasoning=True)
    assert whole == {"reasoning": f"I could call {X} but no.", "calls": [BERGEN],
                     "finish": "tool_calls"}
    for pieces in byte_splits(raw, random.Random(7)):
        assert client(pieces, resplit_server_reasoning=True)[0] == whole


def test_pipeline_notes_are_sse_comments() -> None:
    _, comments = client([sse(chars("Still thinking"))], reasoning_open=True)
    assert "toolmend the reply ended inside reasoning (taken to start there: reasoning_open); "\
        "it never closed it, so all of its text after the start went to reasoning" in comments


# --- the fast path inside reasoning -----------------------------------------------------------

def test_plain_reasoning_deltas_are_renamed_without_being_parsed() -> None:
    words = [{"content": "<think>"}] + [{"content": f"word{i} "} for i in range(200)] + \
        [{"content": "</think>"}, {"content": "Answer."}]
    raw = sse(words)
    m = ChatMender("hermes", TOOLS)
    fed: list[Any] = []
    feed = m.feed
    m.feed = lambda chunk: (fed.append(chunk), feed(chunk))[1]  # type: ignore[method-assign]
    p = StreamPipeline(False, m)
    out = p.feed(raw) + p.finish()
    evs = [e for e in SSEDecoder().feed(out) if isinstance(e, SSEEvent)][:-1]
    got = view([orjson.loads(e.data) for e in evs])
    assert got == {"reasoning_content": "".join(f"word{i} " for i in range(200)),
                   "content": "Answer.", "calls": [], "finish": "stop"}
    assert len(fed) <= 6  # the first deltas, the markers and the finish: not the 200 words


def test_renamed_and_parsed_paths_give_the_client_the_same_deltas() -> None:
    deltas = [{"content": "<think>"}, {"content": "a é 🌍"}, {"content": "b"},
              {"content": "</think>"}, {"content": "c"}]

    class Always(ChatMender):
        def wants(self, data: bytes) -> bool:
            return True

    def run_with(m: ChatMender) -> list[Any]:
        p = StreamPipeline(False, m)
        out = p.feed(sse(deltas)) + p.finish()
        return [(c["delta"], c["finish_reason"]) for e in SSEDecoder().feed(out)
                if isinstance(e, SSEEvent) and not e.is_done
                for c in orjson.loads(e.data)["choices"]]

    assert run_with(ChatMender("hermes", TOOLS)) == run_with(Always("hermes", TOOLS))


# --- split invariance across every reasoning boundary -----------------------------------------

REASONING_VOCAB: dict[str, list[str]] = {
    "hermes": ["<think>", "</think>", X, Y, "<tool_call>", '{"name": "get_weather", ',
               '"arguments": {"city": "Ber', 'gen"}}', "</tool_call>", " ", "\n", "no", "é",
               "🌧️", "日本", "</thi", "nk>", "<thi"],
    "mistral": ["[THINK]", "[/THINK]", "[TOOL_CALLS]get_weather[ARGS]", '{"city": "Bergen"}',
                " ", "\n", "no", "é", "🌧️", "[/THI", "NK]"],
    "deepseek_v3": ["<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>",
                    "function<｜tool▁sep｜>get_weather\n```json\n", '{"city": "Bergen"}',
                    "\n```", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", " ", "no", "é"],
    "qwen3_coder": ["<think>", "</think>", "<tool_call>", "\n<function=get_weather>\n",
                    "<parameter=city>\nBergen\n</parameter>\n", "</function>", "</tool_call>",
                    " ", "\n", "no", "é"],
    "auto": ["<think>", "</think>", X, Y, "[TOOL_CALLS]", "[THINK]", "[/THINK]", " ", "\n",
             "no", "é", "🌧️", "</thi"],
    "glm45": ["<think>", "</think>", "<tool_call>", "get_weather\n<arg_key>city</arg_key>",
              "<arg_value>Bergen</arg_value>", "</tool_call>", " ", "\n", "no", "é"],
    "minimax_m2": ["<think>", "</think>", "<minimax:tool_call>", '<invoke name="get_weather">',
                   '<parameter name="city">Bergen</parameter>', "</invoke>",
                   "</minimax:tool_call>", " ", "\n", "no", "é"],
    "llama3_json": ["<think>", "</think>", '{"name": "get_weather", ',
                    '"parameters": {"city": "Bergen"}}', "<|python_tag|>", ";", " ", "\n", "no",
                    "é", "</thi"],
    "seed_oss": ["<seed:think>", "</seed:think>", "<seed:tool_call>",
                 "\n<function=get_weather>\n", "<parameter=city>\nBergen\n</parameter>\n",
                 "</function>", "</seed:tool_call>", " ", "\n", "no", "é", "</seed:thi"],
    "deepseek_v32": ["<think>", "</think>", "<｜DSML｜function_calls>",
                     '<｜DSML｜invoke name="get_weather">',
                     '<｜DSML｜parameter name="city" string="true">Bergen</｜DSML｜parameter>',
                     "</｜DSML｜invoke>", "</｜DSML｜function_calls>", " ", "\n", "no", "é"],
}


def _reply(fmt: str) -> st.SearchStrategy[str]:
    vocab = REASONING_VOCAB[fmt]
    atom = st.one_of(st.sampled_from(vocab), st.text(max_size=3))
    return st.lists(atom, max_size=24).map("".join)


@pytest.mark.parametrize("fmt", sorted(REASONING_VOCAB))
def test_reasoning_boundaries_split_invariance(fmt: str) -> None:
    """Any reply, opened or not, stopped or cut off: 1-character pieces, random pieces, and a
    cut at every position inside each reasoning marker give what the unsplit reply gives."""
    markers = [m for m in REASONING_VOCAB[fmt] if m in ("<think>", "</think>", "[THINK]",
                                                        "[/THINK]", "<seed:think>",
                                                        "</seed:think>")]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=_reply(fmt), opened=st.booleans(), cut=st.booleans(),
           seed=st.integers(0, 2**32 - 1))
    def prop(text: str, opened: bool, cut: bool, seed: int) -> None:
        how = {"reasoning_open": opened, "finish_reason": "length" if cut else "stop"}
        whole = run(fmt, [text], TOOLS, **how).key()
        assert run(fmt, list(text), TOOLS, **how).key() == whole
        rng = random.Random(seed)
        if len(text) > 1:
            points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6)))
            pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)],
                                                strict=True)]
            assert run(fmt, pieces, TOOLS, **how).key() == whole
        for marker in markers:
            at = text.find(marker)
            if at >= 0:
                for k in range(1, len(marker)):
                    i = at + k
                    assert run(fmt, [text[:i], text[i:]], TOOLS, **how).key() == whole

    prop()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=_reply("hermes"), server=st.text(alphabet="ab <é🌧>/thinkol_c", max_size=12),
       opened=st.booleans(), resplit=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_byte_splits_through_the_pipeline(text: str, server: str, opened: bool, resplit: bool,
                                          seed: int) -> None:
    """The same at the byte level, inside UTF-8 sequences and markers, with a server
    reasoning field in front (passed through, or re-split)."""
    deltas: list[dict[str, Any]] = [{"reasoning": server}] if server else []
    rng = random.Random(seed)
    i = 0
    while i < len(text):
        n = rng.randint(1, 5)
        deltas.append({"content": text[i:i + n]})
        i += n
    raw = sse(deltas)
    how = {"reasoning_open": opened, "resplit_server_reasoning": resplit}
    try:
        whole = client([raw], **how)
    except Exception as e:  # a call that cannot be mended is refused: the same way each time
        whole = repr(e)
    for pieces in [[raw[i:i + 1] for i in range(len(raw))], *byte_splits(raw, rng, 3)]:
        try:
            got = client(pieces, **how)
        except Exception as e:
            got = repr(e)
        assert got == whole


def test_parser_never_lets_a_drafted_call_out_before_the_end() -> None:
    """Fed one character at a time, a call written inside reasoning produces no event until
    the parser is finished (the decision needs the end of the reply)."""
    for fmt, text in [("hermes", f"<think>x {Y}"), ("hermes", f"<think>x {Y}</think> "),
                      ("mistral", '[THINK]x [TOOL_CALLS]get_weather[ARGS]{"city": "Bergen"}'),
                      ("auto", f"<think>x {Y}\n")]:
        p = AutoParser(TOOLS) if fmt == "auto" else make_parser(fmt, TOOLS)
        for ch in text:
            assert not any(type(e).__name__.startswith("ToolCall") for e in p.feed(ch)), fmt
        kinds = [type(e).__name__ for e in p.finish() if type(e).__name__.startswith("Tool")]
        assert kinds[0] == "ToolCallStart" and kinds[-1] == "ToolCallEnd", fmt
        assert set(kinds[1:-1]) == {"ToolCallArgs"}, fmt


def test_resplit_reads_server_reasoning_that_comes_after_plain_content() -> None:
    """Even when the mender's fast path is on (plain text before), a server reasoning delta in
    re-split mode is read, never forwarded as it came (Ollama's /v1 sends it beside an empty
    content)."""
    raw = sse([{"content": "Plain. "}, {"content": "", "reasoning": "<think>late"}])
    got, _ = client([raw], resplit_server_reasoning=True)
    assert got == {"content": "Plain. ", "reasoning": "late", "calls": [],
                   "finish": "stop"}


def test_detected_formats_that_cannot_follow_reasoning_are_not_chosen_inside_it() -> None:
    """An unknown model: a Llama 3 or pythonic call marker inside ``<think>`` stays reasoning
    (those formats cannot hold a call as a draft), and no call fires."""
    for text in ('<think><|python_tag|>{"name": "get_weather", "parameters": {}}</think>ok',
                 "<think><|python_start|>[get_weather(city='Bergen')]<|python_end|></think>ok"):
        res = run("auto", list(text), TOOLS)
        assert (res.content, res.calls) == ("ok", []), text
        assert res.reasoning == text.removeprefix("<think>").split("</think>")[0]


def test_reasoning_reopened_after_a_draft_rejects_it() -> None:
    text = f"<think>{X}</think><think>more</think>answer"
    for pieces in ([text], list(text)):
        res = run("hermes", pieces, TOOLS)
        assert (res.reasoning, res.content, res.calls) == (f"{X}more", "answer", [])


@pytest.mark.parametrize(("fmt", "text", "expected"), [
    ("granite", 'Weather.</think><|tool_call|>[{"name": "get_weather", "arguments": '
     '{"city": "Bergen"}}]', ("Weather.", "", ["get_weather"])),
    ("functiongemma", "Hmm.</think>Just text.", ("Hmm.", "Just text.", [])),
    ("phi4_mini", "Hmm.</think>Just text.", ("Hmm.", "Just text.", [])),
    ("glm45", "Hmm.</think>Just text.", ("Hmm.", "Just text.", [])),
])
def test_formats_without_their_own_reasoning_markers_follow_an_opened_reply(
        fmt: str, text: str, expected: tuple[str, str, list[str]]) -> None:
    """The end marker closes the reasoning the template opened; it is never taken for the
    format's own call marker."""
    for pieces in ([text], list(text)):
        res = run(fmt, pieces, TOOLS, reasoning_open=True)
        assert (res.reasoning, res.content, [c.name for c in res.calls]) == expected
