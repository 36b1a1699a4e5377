"""The one event shape every vendor record becomes, and its deterministic id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


def ms_to_iso(ts_ms: int) -> str:
    """Epoch ms to ISO 8601 UTC with milliseconds (the MQTT payload format)."""
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


class Columns:
    """A page's events column by column (one source and vendor), as connectors build them through `PageBuilder`.

    Ids are computed in bulk: the hash state of each series' key prefix is made once and copied per row, so a row
    costs one copy and one update instead of a join, an encode and a fresh hash. `rows()` is what the spool stores.
    """

    __slots__ = ("source", "vendor", "kind", "tenant", "device", "metric", "ts", "value", "text", "attrs")

    def __init__(self, source: str, vendor: str) -> None:
        self.source, self.vendor = source, vendor
        self.kind: list[str] = []
        self.tenant: list[str] = []
        self.device: list[str] = []
        self.metric: list[str] = []
        self.ts: list[Any] = []
        self.value: list[Any] = []
        self.text: list[Any] = []
        self.attrs: list[Any] = []

    def __len__(self) -> int:
        return len(self.ts)

    def append(self, kind: str, tenant: str, device: str, metric: str, ts_ms: int, value: float | None,
               text: str | None, attrs: dict[str, str]) -> None:
        self.kind.append(kind)
        self.tenant.append(tenant)
        self.device.append(device)
        self.metric.append(metric)
        self.ts.append(ts_ms)
        self.value.append(value)
        self.text.append(text)
        self.attrs.append(attrs)

    def extend(self, kind: str, tenant: str, device: list[str], metric: list[str], ts: list[int],
               value: list[float | None], text: list[str | None], attrs: list[dict[str, str]]) -> None:
        """Rows given a column at a time (lists of one length), the kind and tenant once for all of them."""
        n = len(ts)
        self.kind += [kind] * n
        self.tenant += [tenant] * n
        self.device += device
        self.metric += metric
        self.ts += ts
        self.value += value
        self.text += text
        self.attrs += attrs

    @classmethod
    def of(cls, source: str, vendor: str, events: list[Event]) -> Columns:
        cols = cls(source, vendor)
        for e in events:
            cols.append(e.kind, e.tenant, e.device, e.metric, e.ts_ms, e.value, e.text, e.attrs)
        return cols

    def select(self, keep: list[int]) -> Columns:
        """The rows at the indices `keep`, in that order."""
        out = Columns(self.source, self.vendor)
        for name in ("kind", "tenant", "device", "metric", "ts", "value", "text", "attrs"):
            column = getattr(self, name)
            setattr(out, name, [column[i] for i in keep])
        return out

    def event_ids(self) -> list[int]:
        """`event_id` of every row, the same numbers as `Event.event_id`."""
        head = f"{self.source}\x1f{self.vendor}\x1f".encode()
        prefixes: dict[tuple[str, str, str, str], Any] = {}
        ids = []
        new, from_bytes = hashlib.blake2b, int.from_bytes
        for tenant, device, metric, kind, ts in zip(self.tenant, self.device, self.metric, self.kind, self.ts,
                                                    strict=True):
            series = (tenant, device, metric, kind)
            h = prefixes.get(series)
            if h is None:
                h = prefixes[series] = new(head + "\x1f".join((*series, "")).encode(), digest_size=8)
            h = h.copy()
            h.update(str(ts).encode())
            ids.append(from_bytes(h.digest(), "little"))
        return ids

    def spooled(self) -> list[list[Any]]:
        """The spool's columns of this page (`spool.PAGE_COLUMNS`: COLUMNS without the source and vendor)."""
        return [self.event_ids(), self.kind, self.tenant, self.device, self.metric, self.ts, self.value, self.text,
                self.attrs]

    def rows(self) -> list[list[Any]]:
        """The spool/insert rows in COLUMNS order."""
        source, vendor = self.source, self.vendor
        return [[i, source, vendor, k, t, d, m, ts, v, x, a] for i, k, t, d, m, ts, v, x, a in zip(
            self.event_ids(), self.kind, self.tenant, self.device, self.metric, self.ts, self.value, self.text,
            self.attrs, strict=True)]

    def events(self) -> list[Event]:
        source, vendor = self.source, self.vendor
        return [Event(source, vendor, k, t, d, m, ts, v, x, a) for k, t, d, m, ts, v, x, a in zip(
            self.kind, self.tenant, self.device, self.metric, self.ts, self.value, self.text, self.attrs, strict=True)]
