"""The constrained-retry workload: four tools with real constraints, few-shot tool-calling
requests that a small model often gets wrong, and a judge that owes nothing to toolmend.

Shared by the real-stack tests and ``bench/constrained_retries.py``, so the
test's seeded case and the benchmark's requests are the same kind of request.

The judge is the :mod:`jsonschema` library's validator with a :class:`FormatChecker` holding
format functions written here (calendar dates from :mod:`datetime`, RFC 3339 times from one
regex, e-mail and UUID checks of their own), so toolmend's own format checker is never asked
whether its answers are right.
"""

from __future__ import annotations

import datetime
import json
import random
import re
import uuid
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

TIME = r"^([01]\d|2[0-3]):[0-5]\d$"
YMD = r"^\d{4}-\d{2}-\d{2}$"
AIRPORT = r"^[A-Z]{3}$"


def _tool(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS: list[dict[str, Any]] = [
    _tool("book_table", "Reserve a restaurant table", {
        "type": "object",
        "properties": {
            "restaurant": {"type": "string", "minLength": 1, "maxLength": 60},
            "date": {"type": "string", "format": "date", "pattern": YMD},
            "time": {"type": "string", "pattern": TIME},
            "party_size": {"type": "integer", "minimum": 1, "maximum": 12},
            "seating": {"type": "string", "enum": ["indoor", "outdoor", "bar"]},
        },
        "required": ["restaurant", "date", "time", "party_size"],
        "additionalProperties": False}),
    _tool("book_flight", "Book a flight between two airports", {
        "type": "object",
        "properties": {
            "origin": {"type": "string", "pattern": AIRPORT},
            "destination": {"type": "string", "pattern": AIRPORT},
            "date": {"type": "string", "format": "date", "pattern": YMD},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "cabin": {"type": "string", "enum": ["economy", "premium", "business", "first"]},
        },
        "required": ["origin", "destination", "date", "passengers"],
        "additionalProperties": False}),
    _tool("set_reminder", "Set a reminder before an event", {
        "type": "object",
        "properties": {
            "text": {"type": "string", "minLength": 1, "maxLength": 80},
            "when": {"type": "object", "properties": {
                "date": {"type": "string", "format": "date"},
                "time": {"type": "string", "pattern": TIME}},
                "required": ["date", "time"], "additionalProperties": False},
            "minutes_before": {"type": "integer", "minimum": 0, "maximum": 1440},
        },
        "required": ["text", "when", "minutes_before"],
        "additionalProperties": False}),
    _tool("send_invite", "Invite someone to a meeting", {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "start": {"type": "string", "format": "date-time"},
            "duration_hours": {"type": "number", "minimum": 0.25, "maximum": 8},
            "meeting_id": {"type": "string", "format": "uuid"},
            "guests": {"type": "array", "items": {"type": "string", "format": "email"},
                       "maxItems": 3},
            "note": {"anyOf": [{"type": "string", "maxLength": 100}, {"type": "null"}]},
        },
        "required": ["email", "start", "duration_hours"],
        "additionalProperties": False}),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# --- the judge ---------------------------------------------------------------------------------

_RFC3339_TIME = re.compile(
    r"(\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|[+-](\d{2}):(\d{2}))", re.ASCII)
_EMAIL = re.compile(r"[^@\s]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", re.ASCII)
JUDGE_FORMATS = FormatChecker(formats=())


@JUDGE_FORMATS.checks("date")
def _date(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value, re.ASCII):
        return False
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return False
    return True


@JUDGE_FORMATS.checks("time")
def _time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    m = _RFC3339_TIME.fullmatch(value)
    if m is None:
        return False
    h, mi, s = int(m[1]), int(m[2]), int(m[3])
    tz_ok = m[4] is None or (int(m[4]) < 24 and int(m[5]) < 60)
    return h < 24 and mi < 60 and s <= 60 and tz_ok


@JUDGE_FORMATS.checks("date-time")
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    date, sep, time = value.partition("T") if "T" in value else value.partition("t")
    return bool(sep) and _date(date) and _time(time)


@JUDGE_FORMATS.checks("email")
def _email(value: object) -> bool:
    return not isinstance(value, str) or (_EMAIL.fullmatch(value) is not None
                                          and ".." not in value)


@JUDGE_FORMATS.checks("uuid")
def _uuid(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        return len(value) == 36 and str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


JUDGES = {name: Draft202012Validator(schema, format_checker=JUDGE_FORMATS)
          for name, schema in SCHEMAS.items()}


def judge(name: str, arguments: str) -> str | None:
    """``None`` when the call is valid, else what is wrong (the judge's first error)."""
    if name not in JUDGES:
        return f"unknown tool {name!r}"
    try:
        value = json.loads(arguments)
    except ValueError as e:
        return f"not JSON: {e}"
    error = next(iter(JUDGES[name].iter_errors(value)), None)
    return None if error is None else f"/{'/'.join(map(str, error.path))}: {error.message}"


# --- the requests ------------------------------------------------------------------------------

def _shot(i: int, question: str, name: str, args: dict[str, Any], result: str,
          answer: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": result},
        {"role": "assistant", "content": answer},
    ]


SYSTEM = "You are a booking assistant. Use the tools to act on the user's requests."
#: Earlier steps of the agent's loop. A base model makes real, unforced calls after a few
#: (measured on Gemma 270M). Their arguments were written the way the user said them, as by
#: an agent with nothing validating its calls: ``7.30pm``, ``Oct 5``, ``Oslo`` for an airport.
#: The model then writes most of its own calls that way too, so most requests need a retry,
#: and the retry has to hold against a history that pulls the other way.
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": SYSTEM},
    *_shot(0, "Get me a table at Nomad for 4 on October 2nd at half past seven.",
           "book_table", {"restaurant": "Nomad", "date": "October 2nd", "time": "7.30pm",
                          "party_size": 4},
           '{"status": "confirmed"}', "Done: Nomad, 2 October at 19:30 for 4."),
    *_shot(1, "Fly two of us from Oslo to Paris on the 14th of November.",
           "book_flight", {"origin": "Oslo", "destination": "Paris", "date": "14/11/2026",
                           "passengers": 2},
           '{"status": "booked"}', "Booked: Oslo to Paris on 14 November for 2."),
    *_shot(2, "Remind me to call the dentist on Oct 5 at 9am, an hour before.",
           "set_reminder", {"text": "Call the dentist", "when": {"date": "Oct 5",
                                                                   "time": "9am"},
                            "minutes_before": 60},
           '{"status": "set"}', "Reminder set for 5 October at 9am."),
    *_shot(3, "Invite ana@example.org to a one-hour sync on October 6 at 3pm.",
           "send_invite", {"email": "ana@example.org", "start": "October 6 3pm",
                           "duration_hours": 1},
           '{"status": "sent"}', "Invitation sent to ana@example.org."),
]

_RESTAURANTS = ["Noma", "Maaemo", "Le Cinq", "Sushi Saito", "The Ledbury", "Alinea", "Geranium"]
_DAYS = ["February 30th", "April 31st", "the 3rd of October", "2026/10/03", "next Friday",
         "Oct 12", "June 31", "December 24th", "the 29th of February", "tomorrow",
         "November 31st", "13/10/2026", "the first of December"]
_TIMES = ["7pm", "8:30", "quarter past six", "noon", "19:00", "half past 8 in the evening",
          "6", "9.15pm", "midnight", "1930", "7 in the morning", "5:45 pm"]
_CITIES = ["New York", "Tokyo", "Berlin", "Rome", "Lima", "Cairo", "Sydney", "Toronto",
           "Madrid", "Dubai", "Chicago", "Nairobi"]
_PEOPLE = ["john at example dot com", "Maria from sales", "li.wei@example", "dr. Okafor",
           "sam@example.com", "my manager", "kim (kim@example.net)", "the whole team"]
_SIZES = [2, 3, 6, 8, 14, 20, 1, 25]


def question(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return (f"Book {rng.choice(_RESTAURANTS)} for {rng.choice(_SIZES)} people on "
                f"{rng.choice(_DAYS)} at {rng.choice(_TIMES)}.")
    if kind == 1:
        return (f"Find me a flight from {rng.choice(_CITIES)} to {rng.choice(_CITIES)} on "
                f"{rng.choice(_DAYS)} for {rng.choice([1, 2, 4, 10, 12])} people.")
    if kind == 2:
        ahead = rng.choice(["a day", "two days", "30 minutes", "3 hours"])
        return (f"Remind me about the budget review on {rng.choice(_DAYS)} at "
                f"{rng.choice(_TIMES)}, {ahead} before.")
    return (f"Invite {rng.choice(_PEOPLE)} to a {rng.choice(['quick', 'two-hour', '10-hour'])} "
            f"call on {rng.choice(_DAYS)} at {rng.choice(_TIMES)}.")


def request(seed: int, *, max_tokens: int = 140) -> dict[str, Any]:
    """Request number ``seed``: the few-shot history and one question, sampled with ``seed``
    (the same body on every path). One call per reply: the stop string ends it after the call,
    as the real-stack tests do (the server still parses a call whose closing tag it removed)."""
    rng = random.Random(seed)
    return {"model": "gemma", "messages": [*HISTORY, {"role": "user", "content": question(rng)}],
            "tools": TOOLS, "tool_choice": "auto", "temperature": 0.7, "seed": seed,
            "max_tokens": max_tokens, "stop": ["</tool_call>"], "stream": True}
