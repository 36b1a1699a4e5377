"""The one event shape every vendor record becomes, and its deterministic id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

KINDS = ("status", "log", "telemetry", "metric", "alert")

# Column order of a spooled event row and of the ClickHouse insert (ingested_at is added by the sink).
COLUMNS = ("event_id", "source", "vendor", "kind", "tenant", "device", "metric", "ts", "value", "text", "attrs")


def event_id(source: str, vendor: str, tenant: str, device: str, metric: str, kind: str, ts_ms: int) -> int:
    """UInt64 from (source, vendor, tenant, device, metric, kind, ts): the same record always gets the same id,
    and two deployments (two sources) with equal installation or user ids never share one."""
    key = "\x1f".join((source, vendor, tenant, device, metric, kind, str(ts_ms))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True)
class Event:
    """A normalized record; `ts_ms` is epoch milliseconds UTC (DateTime64(3) in ClickHouse).

    A plain frozen dataclass: connectors build it from payloads pydantic already validated at the edge,
    and at hundreds of thousands per run validation twice would cost more than the insert.
    """

    source: str
    vendor: str
    kind: str
    tenant: str
    device: str
    metric: str
    ts_ms: int
    value: float | None = None
    text: str | None = None
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def event_id(self) -> int:
        return event_id(self.source, self.vendor, self.tenant, self.device, self.metric, self.kind, self.ts_ms)

    def row(self) -> list[Any]:
        """The spool/insert row in COLUMNS order."""
        return [self.event_id, self.source, self.vendor, self.kind, self.tenant, self.device, self.metric,
                self.ts_ms, self.value, self.text, self.attrs]


# What DateTime64(3) and an ISO payload can hold: an event outside is a dead letter, never a row.
TS_MIN_MS = -2_208_988_800_000  # 1900-01-01T00:00:00.000Z
TS_MAX_MS = 10_413_791_999_999  # 2299-12-31T23:59:59.999Z
TS_RANGE = "1900-01-01..2299-12-31 (DateTime64(3))"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def check_ts_ms(ts_ms: int) -> int:
    """`ts_ms` itself when DateTime64(3) can hold it; a ValueError naming the date otherwise."""
    if not TS_MIN_MS <= ts_ms <= TS_MAX_MS:
        raise ValueError(f"{describe_ms(ts_ms)} is outside {TS_RANGE}")
    return ts_ms


def describe_ms(ts_ms: int) -> str:
    """Epoch ms as an ISO 8601 UTC date for messages, for any year (datetime stops at 9999)."""
    days, rest = divmod(ts_ms, 86_400_000)
    # civil_from_days (H. Hinnant): the proleptic Gregorian date of a day count, exact for every integer
    z = days + 719_468
    era, doe = divmod(z, 146_097)
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day, month = doy - (153 * mp + 2) // 5 + 1, mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    secs, ms = divmod(rest, 1000)
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}" + (f".{ms:03d}" if ms else "")
    return f"{year:04d}-{month:02d}-{day:02d}T{clock}Z"


def seconds_to_ms(seconds: Any) -> int:
    """Unix seconds (float with ms decimals) to epoch ms, rounding half-even as the briefs ask.

    A vendor's epoch is never before 1970: anything that is not a finite, non-negative number of seconds
    DateTime64(3) can hold (a bool, NaN, Infinity, 1e300, year 9999, -5) raises ValueError quoting it.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float | str):
        raise ValueError(f"not epoch seconds: {seconds!r}"[:200])
    if isinstance(seconds, int):
        ms = seconds * 1000
    else:
        text = repr(seconds) if isinstance(seconds, float) else seconds.strip()
        whole, dot, frac = text.partition(".")
        if whole.isascii() and whole.isdigit() and len(frac) <= 3 and (not frac or (frac.isascii() and frac.isdigit())):
            ms = int(whole) * 1000 + (int(frac.ljust(3, "0")) if frac else 0)
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


def parse_iso_ms(text: str) -> int:
    """ISO 8601 (with `Z`, offset, or naive = UTC) to epoch ms (microseconds round half-even).

    Raises ValueError quoting the text when it is no date-time or lies outside DateTime64(3)'s range.
    """
    if not isinstance(text, str):
        raise ValueError(f"not an ISO 8601 date-time: {text!r}"[:200])
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date-time: {text[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms, us = divmod((dt - _EPOCH) // _US, 1000)
    ms += us > 500 or (us == 500 and ms % 2)
    if not TS_MIN_MS <= ms <= TS_MAX_MS:
        raise ValueError(f"{text[:40]!r} is outside {TS_RANGE}")
    return ms


def iso_field_ms(value: Any) -> int:
    """A vendor record's ISO 8601 time field to epoch ms; the error (a dead letter's reason) quotes the bad text."""
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 date-time string (got {value!r})"[:200])
    return parse_iso_ms(value)


def ms_to_iso(ts_ms: int) -> str:
    """Epoch ms to ISO 8601 UTC with milliseconds (the MQTT payload format)."""
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
