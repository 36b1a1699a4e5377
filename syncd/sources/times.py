"""One parser per wire format of a vendor's time, each to epoch ms with one rounding rule: half-even on the exact
decimal text (never through a binary float), as the IoT Open brief asks of its float seconds.

Every parser raises ValueError quoting the bad value (a dead letter's reason names the field through pydantic) for
anything that is no such time, or lies outside what DateTime64(3) holds (1900..2299). `Annotated` forms for pydantic
models sit beside each: a field typed `IsoMs` holds epoch ms once validated.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from functools import lru_cache
from typing import Annotated, Any

from pydantic import BeforeValidator

from syncd.events import TS_MAX_MS, TS_MIN_MS, TS_RANGE, describe_ms


def _half_even_ms(whole_ms: int, fraction: str) -> int:
    """`whole_ms` plus the decimal fraction of a second `fraction` (digits after the point), rounded half-even."""
    if len(fraction) <= 3:
        return whole_ms + int(fraction.ljust(3, "0") or "0")
    ms, rest = int(fraction[:3]), fraction[3:]
    half = "5".ljust(len(rest), "0")
    if rest > half or (rest == half and (whole_ms + ms) % 2):
        ms += 1
    return whole_ms + ms


def _in_range(ms: int, what: Any) -> int:
    if not TS_MIN_MS <= ms <= TS_MAX_MS:
        raise ValueError(f"{str(what)[:40]!r} ({describe_ms(ms)}) is outside {TS_RANGE}")
    return ms


# -- epoch numbers ------------------------------------------------------------------------------------------------

def seconds_to_ms(seconds: Any) -> int:
    """Unix seconds (an int, a float with ms decimals, or their text) to epoch ms (IoT Open `timestamp`).

    A vendor's epoch is never before 1970: anything that is not a finite, non-negative number of seconds
    DateTime64(3) can hold (a bool, NaN, Infinity, 1e300, year 9999, -5) raises ValueError quoting it.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float | str):
        raise ValueError(f"not epoch seconds: {seconds!r}"[:200])
    if isinstance(seconds, int):
        ms = seconds * 1000
    elif isinstance(seconds, float) and 0 <= seconds < 1e10 and abs((scaled := seconds * 1000) % 1 - 0.5) > 0.01:
        ms = round(scaled)  # far from a tie the binary product rounds as the decimal text does (error < 1e-3 ms)
    else:
        text = repr(seconds) if isinstance(seconds, float) else seconds.strip()
        whole, _, frac = text.partition(".")
        if whole.isascii() and whole.isdigit() and (not frac or (frac.isascii() and frac.isdigit())):
            ms = _half_even_ms(int(whole) * 1000, frac)
        else:
            try:
                exact = Decimal(text)
            except InvalidOperation:
                raise ValueError(f"not epoch seconds: {seconds!r}"[:200]) from None
            if not exact.is_finite():
                raise ValueError(f"epoch seconds must be a finite number (got {text[:40]})")
            if abs(exact) > 10**12:  # far beyond DateTime64(3): no need to scale it to know
                raise ValueError(f"epoch seconds {text[:40]} are outside {TS_RANGE}")
            ms = int((exact * 1000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    if ms < 0:
        raise ValueError(f"epoch seconds {seconds!r} are negative"[:200])
    if ms > TS_MAX_MS:
        raise ValueError(f"epoch seconds {seconds!r} ({describe_ms(ms)}) are outside {TS_RANGE}"[:200])
    return ms


def seconds_to_ms_all(values: Iterable[Any]) -> list[int]:
    """`seconds_to_ms` of a whole column: the common float (far from a tie) and int inline, the rest through it
    (which raises as it does)."""
    out: list[int] = []
    append = out.append
    for s in values:
        kind = type(s)
        if kind is float and 0.0 <= s < 1e10:
            scaled = s * 1000
            if abs(scaled % 1 - 0.5) > 0.01:
                append(round(scaled))
                continue
        elif kind is int and 0 <= s < 10**10:
            append(s * 1000)
            continue
        append(seconds_to_ms(s))
    return out


def epoch_ms(value: Any, ms_above: float) -> int:
    """An epoch number in seconds, or in milliseconds when above `ms_above` (Ioto writes either, per document)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not an epoch number: {value!r}"[:200])
    if isinstance(value, float) and value != value:
        raise ValueError("not an epoch number: nan")
    if value > ms_above:
        if value > TS_MAX_MS:  # Infinity and 1e300 too: no need to scale it to know
            raise ValueError(f"epoch ms {value!r} are outside {TS_RANGE}"[:200])
        return value if isinstance(value, int) else int(Decimal(repr(value)).quantize(Decimal(1), ROUND_HALF_EVEN))
    return seconds_to_ms(value)


# -- ISO 8601 -------------------------------------------------------------------------------------------------------

_ISO_FRACTION = re.compile(r"(\d{2}:\d{2}:\d{2})[.,](\d+)")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_iso_ms(text: str) -> int:
    """ISO 8601 (`Z`, an offset, or naive = UTC; any number of fraction digits, as .NET writes 7) to epoch ms."""
    if not isinstance(text, str):
        raise ValueError(f"not an ISO 8601 date-time: {text!r}"[:200])
    return _iso_ms(text)


@lru_cache(maxsize=65536)  # a page names the same instants many times (one per tag or key): parse each once
def _iso_ms(text: str) -> int:
    fraction = ""
    m = _ISO_FRACTION.search(text)
    if m is not None:
        fraction = m.group(2)
        bare = text[:m.start()] + m.group(1) + text[m.end():]
    else:
        bare = text
    try:
        dt = datetime.fromisoformat(bare[:-1] + "+00:00" if bare.endswith("Z") else bare)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date-time: {text[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    whole = (dt - _EPOCH).days * 86_400_000 + (dt - _EPOCH).seconds * 1000  # no fraction left in `bare`
    return _in_range(_half_even_ms(whole, fraction), text)


def iso_field_ms(value: Any) -> int:
    """A record's ISO 8601 field to epoch ms; anything but a string is refused (the error quotes it)."""
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 date-time string (got {value!r})"[:200])
    return parse_iso_ms(value)


def iso_or_epoch_ms(ms_above: float) -> Any:
    """A validator for a field that is ISO 8601 text or an epoch number (see `epoch_ms`); never before 1970."""

    def parse(value: Any) -> int:
        if isinstance(value, str) and value:
            return parse_iso_ms(value)
        ms = epoch_ms(value, ms_above)
        if ms < 0:
            raise ValueError(f"not an epoch date: {value!r}"[:200])
        return ms

    return parse


# -- ClickHouse DateTime64 text --------------------------------------------------------------------------------------

_CH_TIME = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?")


@lru_cache(maxsize=8192)
def _second_ms(text: str) -> int:
    dt = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    return calendar.timegm(dt.timetuple()) * 1000


def clickhouse_ms(text: Any) -> int:
    """ClickHouse DateTime64 text `YYYY-MM-DD hh:mm:ss[.fff…]` (no zone: UTC) to epoch ms (Proxus `Time`)."""
    if not isinstance(text, str):
        raise ValueError(f"must be a DateTime64 string (got {text!r})"[:200])
    return _clickhouse_ms(text)


@lru_cache(maxsize=65536)  # rows share their Time (one per key), and a page reads each Time more than once
def _clickhouse_ms(text: str) -> int:
    m = _CH_TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"{text[:40]!r} is not a DateTime64 like '2025-02-25 09:36:00.000'")
    return _in_range(_half_even_ms(_second_ms(m.group(1)), m.group(2) or ""), text)


# -- ULID --------------------------------------------------------------------------------------------------------

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid_ms(ulid: str) -> int | None:
    """The millisecond time in the first 10 characters of a ULID, None when it is not one."""
    if len(ulid) != 26:
        return None
    try:
        return sum(CROCKFORD.index(c) << (5 * (9 - i)) for i, c in enumerate(ulid[:10].upper()))
    except ValueError:
        return None


# -- for pydantic models ----------------------------------------------------------------------------------------------

EpochSecondsMs = Annotated[int, BeforeValidator(seconds_to_ms)]
IsoMs = Annotated[int, BeforeValidator(iso_field_ms)]
ClickHouseMs = Annotated[int, BeforeValidator(clickhouse_ms)]
