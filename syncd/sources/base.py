"""What every connector is: it lists its streams and fetches one page at a time from a cursor.

A source never writes, commits or sleeps for timing: the engine (scheduler, spool, throttle) does.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson
import structlog
from pydantic import BaseModel, TypeAdapter, ValidationError

from syncd.errors import VendorAuthError
from syncd.events import TS_MAX_MS, TS_MIN_MS, TS_RANGE, Columns, Event, describe_ms
from syncd.http import VendorClient, default_error
from syncd.settings import SourceBase, start_ms

log = structlog.get_logger("syncd.sources")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass(frozen=True)
class Stream:
    """One incremental feed of a source, e.g. `log/10` (the log of installation 10).

    A `push` stream is a long-running subscription (`Source.listen`) instead of paged fetches.
    """

    name: str
    kind: str
    tenant: str = ""
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    push: bool = False


@dataclass(frozen=True)
class DeadLetter:
    """A raw record that could not become an event, with the reason."""

    reason: str
    payload: str


class Page:
    """One fetch: its events, records that failed normalization, the next cursor, and whether to stop.

    Events come as a list of `Event`, or column by column from a `PageBuilder` (`columns`): then `events` is made
    only when someone asks (tests), and the spool gets `rows()` straight from the columns.
    """

    __slots__ = ("_events", "columns", "cursor", "done", "dead", "lag_s", "late")

    def __init__(self, events: list[Event] | None = None, cursor: Any = None, done: bool = False,
                 dead: list[DeadLetter] | None = None, lag_s: float | None = None, late: int = 0, *,
                 columns: Columns | None = None) -> None:
        self._events = events if events is not None or columns is not None else []
        self.columns = columns
        self.cursor = cursor
        self.done = done
        self.dead: list[DeadLetter] = dead if dead is not None else []
        self.lag_s = lag_s  # how far behind "now" the stream still is after this page
        self.late = late  # rows a re-read found that earlier reads had missed (counted in syncd_late_rows_total)

    @property
    def events(self) -> list[Event]:
        if self._events is None:
            assert self.columns is not None
            self._events = self.columns.events()
        return self._events

    @events.setter
    def events(self, events: list[Event]) -> None:
        self._events, self.columns = events, None

    def __len__(self) -> int:
        """The number of events."""
        return len(self.columns) if self.columns is not None else len(self.events)

    def rows(self) -> list[list[Any]]:
        """The spool rows (COLUMNS order), ids computed in bulk."""
        if self.columns is not None:
            return self.columns.rows()
        return [e.row() for e in self.events]

    def __repr__(self) -> str:
        return f"Page({len(self)} events, {len(self.dead)} dead, done={self.done}, cursor={str(self.cursor)[:80]})"


class PageBuilder:
    """A page built column by column: `add` a record's fields, then `page(...)`; what `Source.event` is per event.

    The source and vendor are set once per page, attrs dicts are shared as given (events never mutate them), and
    ids are computed in bulk when the page is spooled.
    """

    __slots__ = ("columns", "add")

    def __init__(self, source: Source) -> None:
        self.columns = Columns(source.name, source.vendor)
        self.add = self.columns.append  # add(kind, tenant, device, metric, ts_ms, value, text, attrs)

    def __len__(self) -> int:
        return len(self.columns)

    def page(self, cursor: Any, done: bool, dead: list[DeadLetter] | None = None, lag_s: float | None = None,
             late: int = 0) -> Page:
        return Page(None, cursor, done, dead, lag_s, late, columns=self.columns)


class Source(ABC):
    """A configured vendor account; subclasses implement `discover` and `fetch`."""

    vendor: ClassVar[str]
    default_streams: ClassVar[tuple[str, ...]]
    default_rate: ClassVar[float]
    default_burst: ClassVar[int]
    map_error = staticmethod(default_error)  # how this vendor's HTTP errors become ours
    instance = "syncd-0"  # the daemon instance (set by the engine): stable ids such as MQTT client ids derive from it

    def __init__(self, config: SourceBase, client: VendorClient, clock: Callable[[], float] = time.time) -> None:
        self.resume: dict[str, int] = {}  # stream name -> epoch ms to start from, set by the engine (first_ms)
        self.config = config
        self.client = client
        self.clock = clock
        self.name = config.name

    @property
    def enabled_kinds(self) -> tuple[str, ...]:
        return tuple(self.config.streams) if self.config.streams else self.default_streams

    async def login(self) -> None:
        """Check the credential up front so a bad key fails the first run fast (default: nothing to do)."""

    async def relogin(self) -> bool:
        """Get a fresh credential after a 401; False when the source has nothing to log in with."""
        return False

    async def relogged(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, and once more after a fresh login when the vendor refused the credential (a token that expired)."""
        try:
            return await call()
        except VendorAuthError:
            if not await self.relogin():
                raise
            log.info("source.relogin", source=self.name)
            return await call()

    @abstractmethod
    async def discover(self) -> list[Stream]:
        """The streams this source owns right now (inventory calls happen here)."""

    @abstractmethod
    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        """One page from `cursor` (None on the first run)."""

    async def listen(self, stream: Stream, deliver: Callable[[Page], Awaitable[None]], stop: asyncio.Event,
                     idle: float | None) -> None:
        """Receive a push stream until `stop` is set or, with `idle`, nothing arrived for `idle` seconds.

        Call `await deliver(page)` per message or batch; it returns once the page is committed to the spool,
        and only then may the messages be acknowledged to the broker. Broker errors raise our error classes.
        """
        raise NotImplementedError(f"{self.vendor} has no push streams")

    async def health(self, stream: Stream) -> str:
        """What upstream keeps a push stream from receiving (the vendor's output is off, say); "" when nothing."""
        return ""

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def first_ms(self, now_ms: int, stream: str) -> int:
        """Where a stream with no cursor starts: the sink's newest event of it minus `RESUME_OVERLAP_MS` when
        the engine found one (state.db lost, the store kept), else the source's `start` setting."""
        resumed = self.resume.get(stream)
        return resumed if resumed is not None else start_ms(self.config.start, now_ms)

    def event(self, kind: str, tenant: str, device: str, metric: str, ts_ms: int, value: float | None = None,
              text: str | None = None, attrs: dict[str, str] | None = None) -> Event:
        return Event(
            source=self.name, vendor=self.vendor, kind=kind, tenant=tenant, device=device, metric=metric,
            ts_ms=ts_ms, value=value, text=text, attrs=attrs or {},
        )


class FieldError(ValueError):
    """A record field that cannot become part of an event; the dead letter's reason names the field."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.field = name


def mapped(records: Iterable[Any], dead: list[DeadLetter], fn: Callable[[Any], T],
           context: Callable[[Any], Any] | None = None) -> Iterator[T]:
    """`fn(record)` for every record; one whose mapping raises anything becomes a dead letter instead.

    Any class, not only validation errors: one bad value (an OverflowError from an `Infinity` id, an
    InvalidOperation from a huge number) must cost its record, never the stream. `fn` does the whole
    mapping, so what the caller does with its result (cursor bookkeeping) cannot fail half-way.
    `context` wraps a failed record for the dead letter (e.g. with the agent it came from). A record the vendor
    serves again is dead-lettered again; the spool keeps one of each (same stream, reason and payload).
    """
    for raw in records:
        try:
            out = fn(raw)
        except Exception as err:  # whatever its class, it is this record's fault
            dead.append(dead_letter(context(raw) if context else raw, err))
            continue
        yield out


def valid(model: type[M], records: Iterable[Any], dead: list[DeadLetter],
          context: Callable[[Any], Any] | None = None) -> Iterator[M]:
    """The records that validate as `model`; every other one becomes a dead letter naming the bad field."""
    return mapped(records, dead, model.model_validate, context)


@functools.lru_cache(maxsize=64)
def _adapter(model: Any, many: bool) -> TypeAdapter[Any]:
    return TypeAdapter(list[model] if many else model)


def valid_all(model: Any, records: list[Any], dead: list[DeadLetter],
              context: Callable[[Any], Any] | None = None) -> list[Any]:
    """`valid` for a whole page: one pydantic call for all records; only when that fails, record by record, so
    every dead letter still names its record and field. `model` is a pydantic model or a TypedDict (no instance
    per record: the fastest pydantic has for a hot page)."""
    try:
        return _adapter(model, True).validate_python(records)  # type: ignore[no-any-return]
    except ValidationError:
        return list(mapped(records, dead, _adapter(model, False).validate_python, context))


def dead_letter(record: Any, err: Exception) -> DeadLetter:
    """A dead letter for a record that failed, naming the bad field where the error knows it."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<record>"
        reason = f"{where}: {first['msg']}"
    elif isinstance(err, FieldError):
        reason = str(err)
    else:
        reason = f"{err.__class__.__name__}: {err}"
    return DeadLetter(spoolable_text(reason[:2000]), payload_json(record))


def payload_json(record: Any) -> str:
    """A record as JSON text the spool and every sink can hold, keeping the evidence; never raises.

    The standard library, not orjson: orjson writes NaN and Infinity as `null` (the very value a dead letter is
    about) and refuses lone surrogates and integers beyond 64 bits. A lone surrogate is written as a `\\ud83d`
    escape (`ensure_ascii`), since the spool encodes UTF-8; a record that is no JSON at all is kept as its repr.
    """
    try:
        text = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))
        return text if text.isascii() or _utf8(text) else json.dumps(record, ensure_ascii=True, default=str,
                                                                       separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return ascii(record)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def spoolable_text(text: str) -> str:
    """`text` itself when UTF-8 can encode it, else with each lone surrogate written as a `\\udXXX` escape.

    For cursor keys and messages made from vendor strings: the spool encodes them as UTF-8 JSON.
    """
    if text.isascii() or _utf8(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def loads_lenient(data: bytes | str) -> Any:
    """JSON as orjson reads it, else as the standard library does; ValueError when neither can.

    The standard library also reads what JavaScript servers emit and orjson refuses: `NaN`, `Infinity`,
    lone surrogate escapes (a cut emoji), integers beyond 64 bits. The guard then decides what to keep.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


# -- the guard before the spool -------------------------------------------------------------------------

_RAW_FLOAT = {math.inf: "Infinity", -math.inf: "-Infinity"}


def guard_page(page: Page) -> Page:
    """The page with only events a sink can hold; every refused event becomes a dead letter naming the field.

    The one check between every connector and the spool (the scheduler runs it on each page it commits):
    - `ts_ms` is an int (not a bool) within TS_MIN_MS..TS_MAX_MS: what DateTime64(3) stores and the MQTT
      payload's ISO `ts` can print (ClickHouse takes a year 33658 and then fails reading it back);
    - tenant, device, metric, text and the attrs keys and values are str that UTF-8 can encode: a lone
      surrogate (a JSON `\\ud83d` escape, what JavaScript emits for a cut emoji) fails the spool's encoder;
    - a NaN or ±Infinity `value` is stored as None with its raw text in `attrs["raw_value"]`, not refused:
      the reading happened, NULL keeps the row (Float64 NaN would poison aggregates and cannot go into
      JSON) and the raw text keeps the evidence.
    Dead letters already on the page and the cursor are made spoolable too. The page is not modified.
    """
    dead = [_spoolable_dead(d) for d in page.dead]
    cursor = _spoolable_cursor(page.cursor)
    attrs_ok: set[int] = set()  # attrs dicts are shared by a device's events: check each once per page
    if page.columns is not None and _clean(page.columns):  # the usual page: column-wise checks, nothing to change
        return Page(None, cursor, page.done, dead, page.lag_s, page.late, columns=page.columns)
    if page.columns is not None:
        cols = page.columns
        keep: list[int] = []
        fixed: dict[int, dict[str, str]] = {}  # row → attrs with the raw text of a NaN or ±Infinity value
        for i, fields in enumerate(zip(cols.kind, cols.tenant, cols.device, cols.metric, cols.ts, cols.value,
                                       cols.text, cols.attrs, strict=True)):
            _, tenant, device, metric, ts, value, text, attrs = fields
            problem = _refusal(tenant, device, metric, ts, value, text, attrs, attrs_ok)
            if problem is not None:
                dead.append(DeadLetter(spoolable_text(problem), payload_json(_as_record(cols.source, cols.vendor,
                                                                                        *fields))))
                continue
            if value is not None and not _finite(value):
                fixed[len(keep)] = {**attrs, "raw_value": _raw_float(value)}
            keep.append(i)
        columns = cols if len(keep) == len(cols) and not fixed else cols.select(keep)
        for at, attrs in fixed.items():
            columns.value[at], columns.attrs[at] = None, attrs
        return Page(None, cursor, page.done, dead, page.lag_s, page.late, columns=columns)
    events: list[Event] = []
    for event in page.events:
        e = event
        problem = _refusal(e.tenant, e.device, e.metric, e.ts_ms, e.value, e.text, e.attrs, attrs_ok)
        if problem is not None:
            dead.append(DeadLetter(spoolable_text(problem), payload_json(_as_record(
                e.source, e.vendor, e.kind, e.tenant, e.device, e.metric, e.ts_ms, e.value, e.text, e.attrs))))
            continue
        if e.value is not None and not _finite(e.value):
            event = dataclasses.replace(e, value=None, attrs={**e.attrs, "raw_value": _raw_float(e.value)})
        events.append(event)
    return Page(events, cursor, page.done, dead, page.lag_s, page.late)


def _clean(cols: Columns) -> bool:
    """Whether every row passes `_refusal` and no value is NaN or ±Infinity, checked a column at a time in C loops
    (min, max, join, fsum); False sends the page row by row, which finds and names what is wrong."""
    ts = cols.ts
    if not ts:
        return True
    if not all(type(t) is int for t in ts) or min(ts) < TS_MIN_MS or max(ts) > TS_MAX_MS:
        return False
    texts = [t for t in cols.text if t is not None]
    for column in (cols.tenant, cols.device, cols.metric, texts):
        if not all(type(x) is str for x in column) or not _utf8_text("".join(column)):
            return False
    values = [v for v in cols.value if v is not None]
    if not all(type(v) is float or type(v) is int for v in values):
        return False
    try:
        if not math.isfinite(math.fsum(values)):  # NaN or ±Infinity somewhere (fsum raises for inf + -inf)
            return False
    except (ValueError, OverflowError):
        return False
    distinct = {id(a): a for a in cols.attrs}
    return all(type(a) is dict and all(type(k) is str and type(v) is str for k, v in a.items())
               and _utf8_text("".join(a) + "".join(a.values())) for a in distinct.values())


def _utf8_text(text: str) -> bool:
    return text.isascii() or _utf8(text)


def _raw_float(value: Any) -> str:
    return _RAW_FLOAT.get(value, "NaN") if isinstance(value, float) else str(value)


def _refusal(tenant: Any, device: Any, metric: Any, ts: Any, value: Any, text: Any, attrs: Any,
             attrs_ok: set[int]) -> str | None:
    """Why a sink cannot hold an event of these fields (the field first), or None."""
    if type(ts) is not int:
        return f"ts: must be integer epoch milliseconds (got {ts!r})"[:300]
    if not TS_MIN_MS <= ts <= TS_MAX_MS:
        return f"ts: {describe_ms(ts)} is outside {TS_RANGE}"
    for name, item in (("tenant", tenant), ("device", device), ("metric", metric)):
        why = _text_problem(item)
        if why is not None:
            return f"{name}: {why}"
    if text is not None:
        why = _text_problem(text)
        if why is not None:
            return f"text: {why}"
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"value: must be a number or null (got {type(value).__name__})"
    if id(attrs) not in attrs_ok:
        if not isinstance(attrs, dict):
            return f"attrs: must be a map of strings (got {type(attrs).__name__})"
        for key, item in attrs.items():
            why = _text_problem(key)
            if why is not None:
                return f"attrs: key {json.dumps(key) if isinstance(key, str) else repr(key)} {why}"[:300]
            why = _text_problem(item)
            if why is not None:
                return f"attrs.{spoolable_text(key)[:100]}: {why}"
        attrs_ok.add(id(attrs))
    return None


def _text_problem(text: Any) -> str | None:
    if type(text) is not str:
        return f"must be a string (got {type(text).__name__})"
    return None if text.isascii() or _utf8(text) else "contains a lone surrogate"


def _finite(value: float | int) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _as_record(source: str, vendor: str, kind: str, tenant: Any, device: Any, metric: Any, ts: Any, value: Any,
               text: Any, attrs: Any) -> dict[str, Any]:
    return {"source": source, "vendor": vendor, "kind": kind, "tenant": tenant, "device": device, "metric": metric,
            "ts_ms": ts, "value": value, "text": text, "attrs": attrs}


def _spoolable_dead(letter: DeadLetter) -> DeadLetter:
    reason, payload = spoolable_text(str(letter.reason)), spoolable_text(str(letter.payload))
    if reason is letter.reason and payload is letter.payload:
        return letter
    return DeadLetter(reason, payload)


def _spoolable_cursor(cursor: Any) -> Any:
    """The cursor, with any string UTF-8 cannot encode escaped (a connector's own keys should already be)."""
    try:
        orjson.dumps(cursor)
    except TypeError:
        return _escape_strings(cursor)
    return cursor


def _escape_strings(value: Any) -> Any:
    if isinstance(value, str):
        return spoolable_text(value)
    if isinstance(value, dict):
        return {_escape_strings(k): _escape_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_strings(v) for v in value]
    return value


# -- late rows: a trailing re-read at a slower cadence (DESIGN.md "Late rows") ------------------------------------

def late_settings(config: Any, window_s: float, every_s: float) -> tuple[int, float]:
    """(`late_window` in ms, `reconcile_every` in s) of a source's config; the vendor's defaults where unset."""
    window = getattr(config, "late_window", None)
    every = getattr(config, "reconcile_every", None)
    return int((window_s if window is None else window) * 1000), float(every_s if every is None else every)


def reconcile_due(last: Any, now_s: float, every_s: float) -> bool:
    """Whether a stream whose last re-read started at `last` (clock seconds; None: never) re-reads now."""
    return not isinstance(last, int | float) or isinstance(last, bool) or now_s - last >= every_s


def first_in_past(source: Source, now_ms: int, stream: str, back_ms: int) -> int:
    """Where a stream with no cursor starts (`Source.first_ms`), never after now.

    A resume point past now (the store's newest event was stamped ahead by a device with a wrong clock) would
    hold the stream until that time; it starts `back_ms` before now instead.
    """
    first = source.first_ms(now_ms, stream)
    return first if first <= now_ms else now_ms - back_ms


class LateTally:
    """Rows a stream stored per time bucket over its trailing late window, kept in its cursor (`state()`).

    Forward reads `add` each row they store; a re-read `recount`s each row it finds before what the forward reads
    had covered, and `settle(since, upto)` compares bucket by bucket: a bucket now holding more rows than were
    stored in it holds that many late rows (they appeared after the forward read had passed their time). Only
    buckets the re-read covered whole are compared; a partly covered one waits for the next re-read, so each late
    row is counted once. A few dozen numbers, never the rows' keys; exact as long as the vendor deletes nothing.
    """

    BUCKETS = 48  # per late window

    def __init__(self, state: Any, window_ms: int) -> None:
        self.window_ms = window_ms
        self.size = max(60_000, -(-window_ms // self.BUCKETS) // 1000 * 1000)  # whole seconds, a minute at least
        ok = isinstance(state, dict) and state.get("size") == self.size  # another window size: start again
        self.stored = _counts(state.get("stored") if ok else None, self.size)
        self.found = _counts(state.get("found") if ok else None, self.size)

    def align(self, ts_ms: int) -> int:
        """The start of the bucket holding `ts_ms` (a re-read starts there, so its first bucket is whole)."""
        return ts_ms - ts_ms % self.size

    def add(self, ts_ms: int) -> None:
        b = self.align(ts_ms)
        self.stored[b] = self.stored.get(b, 0) + 1

    def recount(self, ts_ms: int) -> None:
        b = self.align(ts_ms)
        self.found[b] = self.found.get(b, 0) + 1

    def add_all(self, stamps: Iterable[int], since_ms: int = 0, upto_ms: int = 0) -> None:
        """`add` each stamp, or `recount` it when in [since_ms, upto_ms) (what a re-read covers)."""
        size, stored, found = self.size, self.stored, self.found
        for b, n in collections.Counter(t - t % size for t in stamps if not since_ms <= t < upto_ms).items():
            stored[b] = stored.get(b, 0) + n
        if since_ms < upto_ms:
            for b, n in collections.Counter(t - t % size for t in stamps if since_ms <= t < upto_ms).items():
                found[b] = found.get(b, 0) + n

    def settle(self, since_ms: int, upto_ms: int) -> int:
        """Late rows of a re-read of [since_ms, upto_ms) that has ended; the buckets it covered whole learn its counts."""
        late = 0
        for b, n in self.found.items():
            if b >= since_ms and b + self.size <= upto_ms and n > self.stored.get(b, 0):
                late += n - self.stored.get(b, 0)
                self.stored[b] = n
        self.found = {}
        return late

    def state(self, covered_ms: int) -> dict[str, Any]:
        """For the cursor: the buckets a re-read may still compare, the stream having read up to `covered_ms`.

        Dense: [first bucket, its count, the next bucket's count, ...]. A cursor is decoded and encoded every
        run; a map of ~150 string keys cost 60 µs a run, these lists a tenth of it."""
        low, high = covered_ms - 2 * self.window_ms - self.size, covered_ms + self.window_ms
        return {"size": self.size, "stored": _dense(self.stored, low, high, self.size),
                "found": _dense(self.found, low, high, self.size)}


def _counts(counts: Any, size: int) -> dict[int, int]:
    """Bucket start -> rows, from `_dense`'s list (or the {"bucket": rows} map cursors held before it)."""
    if isinstance(counts, list) and len(counts) > 1:
        at = int(counts[0])
        return dict(zip(range(at, at + size * (len(counts) - 1), size), map(int, counts[1:]), strict=True))
    if isinstance(counts, dict):
        return {int(b): int(n) for b, n in counts.items()}
    return {}


def _dense(counts: dict[int, int], low: int, high: int, size: int) -> list[int]:
    """The buckets in [low, high] (all multiples of `size`) as [first bucket, its count, the next one's, ...]."""
    if not counts:
        return []
    first, last = max(min(counts), -(-low // size) * size), min(max(counts), high // size * size)
    if first > last:
        return []
    return [first, *map(counts.get, range(first, last + size, size), itertools.repeat(0))]
