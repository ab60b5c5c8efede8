"""The ``format`` values toolmend asserts on tool arguments, each an explicit check.

JSON Schema leaves ``format`` as an annotation unless a validator asserts it, and
:mod:`jsonschema`'s own checkers for ``time``, ``date-time``, ``uri`` and others need optional
packages, so which formats were checked used to depend on what happened to be installed (and
``time`` was not: ``"7pm"`` passed as a ``time``). Here every format agents' tools use has a
check written down, with the RFC it follows:

=============  ==================================================================================
format         valid when
=============  ==================================================================================
``date``       RFC 3339 ``full-date`` ``YYYY-MM-DD`` that exists in the calendar
               (``2026-02-29`` and ``2026-04-31`` do not; ``2024-02-29`` does)
``time``       RFC 3339 ``full-time``: ``HH:MM:SS``, optional fraction, and a ``Z`` or ``±HH:MM``
               offset (``10:10:00Z``; not ``10:10``, ``7pm`` or ``10:10:00`` without offset);
               second ``60`` only as a leap second
``date-time``  RFC 3339 ``date-time``: a ``date``, ``T`` (or ``t``), a ``time``
``duration``   ISO 8601 / RFC 3339 appendix A duration (``P3D``, ``PT1H30M``, ``P2W``)
``email``      ``local@domain``: a dot-atom local part (no leading, trailing or doubled dot), a
               ``hostname`` domain with at least one dot, or an IP literal in brackets
``hostname``   RFC 1123 labels of 1-63 letters, digits and inner hyphens, 253 characters at most
``ipv4``       four decimal octets 0-255, no leading zeros
``ipv6``       RFC 4291 text form (as :mod:`ipaddress` reads it, without a zone index)
``uri``        RFC 3986 absolute URI: a scheme, ``:``, and no spaces or control characters
``uuid``       RFC 4122 ``8-4-4-4-12`` hex digits
``regex``      a pattern RE2 compiles (handled in ``schemas``, where RE2 is configured)
=============  ==================================================================================

Unknown formats are annotations, as the specification says. The same functions serve the
Python validator and the Rust gate (``schemas._gate`` passes them as its ``formats``), so the
two can never disagree on a format. :data:`FORMAT_HINTS` says in words what each format wants,
for a retry's correction message.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable
from typing import Final

__all__ = ["FORMAT_CHECKS", "FORMAT_HINTS", "is_date", "is_date_time", "is_time"]

_DATE: Final = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII)
_TIME: Final = re.compile(
    r"([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|[+-]([0-9]{2}):([0-9]{2}))", re.ASCII)
_DURATION: Final = re.compile(
    r"P(?:[0-9]+W|(?=[0-9]|T[0-9])(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?"
    r"(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+S)?)?)", re.ASCII)
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_ATOM: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+", re.ASCII)
_IPV4: Final = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}", re.ASCII)
_URI: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\x00-\x1f\x7f<>\"{}|\\^`]*", re.ASCII)
_UUID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)


def is_date(value: object) -> bool:
    if not isinstance(value, str):
        return True  # formats apply to strings only
    m = _DATE.fullmatch(value)
    if m is None:
        return False
    try:
        datetime.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:  # month 13, day 30 of February, year 0
        return False
    return True


def is_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    m = _TIME.fullmatch(value)
    if m is None:
        return False
    hour, minute, second = int(m[1]), int(m[2]), int(m[3])
    if hour > 23 or minute > 59 or second > 60:
        return False
    if m[6] is not None and (int(m[6]) > 23 or int(m[7]) > 59):
        return False
    if second == 60:  # a leap second: only at 23:59:60 UTC
        offset = 0 if m[6] is None else (int(m[6]) * 60 + int(m[7])) * (
            -1 if m[5][0] == "-" else 1)
        utc = (hour * 60 + minute - offset) % (24 * 60)
        return utc == 23 * 60 + 59
    return True


def is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if len(value) < 11 or value[10] not in "Tt":
        return False
    return is_date(value[:10]) and is_time(value[11:])


def is_duration(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return _DURATION.fullmatch(value) is not None and not value.endswith("T")


def is_hostname(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not value or len(value) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in value.split("."))


def is_email(value: object) -> bool:
    if not isinstance(value, str):
        return True
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or len(local) > 64:
        return False
    if not all(_ATOM.fullmatch(part) for part in local.split(".")):
        return False
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        return is_ipv4(literal) or (literal[:5].lower() == "ipv6:" and is_ipv6(literal[5:]))
    return "." in domain and is_hostname(domain)


def is_ipv4(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return _IPV4.fullmatch(value) is not None and all(
        int(octet) <= 255 for octet in value.split("."))


def is_ipv6(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if "%" in value or not value or not value.isascii():
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def is_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return _URI.fullmatch(value) is not None


def is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return _UUID.fullmatch(value) is not None


#: format name -> check (``True``: valid, or not a string)
FORMAT_CHECKS: Final[dict[str, Callable[[object], bool]]] = {
    "date": is_date,
    "time": is_time,
    "date-time": is_date_time,
    "duration": is_duration,
    "email": is_email,
    "hostname": is_hostname,
    "ipv4": is_ipv4,
    "ipv6": is_ipv6,
    "uri": is_uri,
    "uuid": is_uuid,
}

#: what each format wants, in words a model can act on (quoted in a retry's correction)
FORMAT_HINTS: Final[dict[str, str]] = {
    "date": "a calendar date YYYY-MM-DD that exists (months 01-12, no 31st of a 30-day month, "
            "29 February only in leap years)",
    "time": "a time HH:MM:SS with a time zone offset, such as 19:00:00Z or 08:30:00+01:00",
    "date-time": "a date and time such as 2026-10-03T19:00:00Z",
    "duration": "an ISO 8601 duration such as P3D or PT1H30M",
    "email": "an e-mail address such as name@example.com",
    "hostname": "a host name such as api.example.com",
    "ipv4": "an IPv4 address such as 192.0.2.10",
    "ipv6": "an IPv6 address such as 2001:db8::1",
    "uri": "an absolute URI such as https://example.com/path",
    "uuid": "a UUID such as 123e4567-e89b-12d3-a456-426614174000",
}
