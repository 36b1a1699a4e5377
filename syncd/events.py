"""The one event shape every vendor record becomes, and its deterministic id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

KINDS = ("status", "log", "telemetry", "metric", "alert")

# Column order of a spooled event row and of the ClickHouse insert (ingested_at is added by the sink).
COLUMNS = ("event_id", "source", "vendor", "kind", "tenant", "device", "metric", "ts", "value", "text", "attrs")


def event_id(vendor: str, tenant: str, device: str, metric: str, kind: str, ts_ms: int) -> int:
    """UInt64 from (vendor, tenant, device, metric, kind, ts): the same record always gets the same id."""
    key = "\x1f".join((vendor, tenant, device, metric, kind, str(ts_ms))).encode()
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
        return event_id(self.vendor, self.tenant, self.device, self.metric, self.kind, self.ts_ms)

    def row(self) -> list[Any]:
        """The spool/insert row in COLUMNS order."""
        return [self.event_id, self.source, self.vendor, self.kind, self.tenant, self.device, self.metric,
                self.ts_ms, self.value, self.text, self.attrs]


def seconds_to_ms(seconds: float | int | str) -> int:
    """Unix seconds (float with ms decimals) to epoch ms, rounding half-even as the briefs ask."""
    if isinstance(seconds, int):
        return seconds * 1000
    text = repr(seconds) if isinstance(seconds, float) else str(seconds)
    whole, dot, frac = text.partition(".")
    if "e" not in text and "E" not in text and len(frac) <= 3:
        return int(whole) * 1000 + (int(frac.ljust(3, "0")) if dot else 0) * (-1 if text.startswith("-") else 1)
    return int((Decimal(str(seconds)) * 1000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def parse_iso_ms(text: str) -> int:
    """ISO 8601 (with `Z`, offset, or naive = UTC) to epoch ms."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def iso_field_ms(value: Any) -> int:
    """A vendor record's ISO 8601 time field to epoch ms; the error (a dead letter's reason) quotes the bad text."""
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 date-time string (got {value!r})")
    try:
        return parse_iso_ms(value)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date-time: {value[:40]!r}") from None


def ms_to_iso(ts_ms: int) -> str:
    """Epoch ms to ISO 8601 UTC with milliseconds (the MQTT payload format)."""
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
