"""What every connector is: it lists its streams and fetches one page at a time from a cursor.

A source never writes, commits or sleeps for timing: the engine (scheduler, spool, throttle) does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from syncd.events import TS_MAX_MS, TS_MIN_MS, TS_RANGE, Event, describe_ms
from syncd.http import VendorClient, default_error
from syncd.settings import SourceBase, start_ms

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


@dataclass
class Page:
    """One fetch: its events, records that failed normalization, the next cursor, and whether to stop."""

    events: list[Event]
    cursor: Any
    done: bool
    dead: list[DeadLetter] = field(default_factory=list)
    lag_s: float | None = None  # how far behind "now" the stream still is after this page
    late: int = 0  # rows a re-read found that earlier reads had missed (counted in syncd_late_rows_total)


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
    events: list[Event] = []
    dead = [_spoolable_dead(d) for d in page.dead]
    attrs_ok: set[int] = set()  # attrs dicts are shared by a device's events: check each once per page
    for event in page.events:
        problem = _refusal(event, attrs_ok)
        if problem is not None:
            dead.append(DeadLetter(spoolable_text(problem), payload_json(_as_record(event))))
            continue
        value = event.value
        if value is not None and not _finite(value):
            raw = _RAW_FLOAT.get(value, "NaN") if isinstance(value, float) else str(value)
            event = dataclasses.replace(event, value=None, attrs={**event.attrs, "raw_value": raw})
        events.append(event)
    return dataclasses.replace(page, events=events, dead=dead, cursor=_spoolable_cursor(page.cursor))


def _refusal(event: Event, attrs_ok: set[int]) -> str | None:
    """Why a sink cannot hold `event` (the field first), or None."""
    ts = event.ts_ms
    if type(ts) is not int:
        return f"ts: must be integer epoch milliseconds (got {ts!r})"[:300]
    if not TS_MIN_MS <= ts <= TS_MAX_MS:
        return f"ts: {describe_ms(ts)} is outside {TS_RANGE}"
    for name, text in (("tenant", event.tenant), ("device", event.device), ("metric", event.metric)):
        why = _text_problem(text)
        if why is not None:
            return f"{name}: {why}"
    if event.text is not None:
        why = _text_problem(event.text)
        if why is not None:
            return f"text: {why}"
    value = event.value
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"value: must be a number or null (got {type(value).__name__})"
    attrs = event.attrs
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


def _as_record(event: Event) -> dict[str, Any]:
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


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
        self.stored = _counts(state.get("stored") if ok else None)
        self.found = _counts(state.get("found") if ok else None)

    def align(self, ts_ms: int) -> int:
        """The start of the bucket holding `ts_ms` (a re-read starts there, so its first bucket is whole)."""
        return ts_ms - ts_ms % self.size

    def add(self, ts_ms: int) -> None:
        b = self.align(ts_ms)
        self.stored[b] = self.stored.get(b, 0) + 1

    def recount(self, ts_ms: int) -> None:
        b = self.align(ts_ms)
        self.found[b] = self.found.get(b, 0) + 1

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
        """For the cursor: the buckets a re-read may still compare, the stream having read up to `covered_ms`."""
        low, high = covered_ms - 2 * self.window_ms - self.size, covered_ms + self.window_ms

        def kept(counts: dict[int, int]) -> dict[str, int]:
            return {str(b): n for b, n in sorted(counts.items()) if low <= b <= high}

        return {"size": self.size, "stored": kept(self.stored), "found": kept(self.found)}


def _counts(counts: Any) -> dict[int, int]:
    return {int(b): int(n) for b, n in counts.items()} if isinstance(counts, dict) else {}


# -- keyset paging under a silent row cap (DESIGN.md "A range ends only when the vendor says so") -----------------

@dataclass
class KeysetPaginator:
    """Keyset paging over rows sorted by a key that several rows may share (a time), from a server that may end
    an answer early without a marker: a row cap below the limit asked for, a body cut exactly at a line boundary.

    In the spirit of dlt's paginators it holds its state (plain JSON for a cursor: `state()`, `KeysetPaginator(**s)`),
    judges each answer (`update_state`) and says whether there is a next page. The next request asks for `limit`
    rows from `key` on (rows at `key` included, unless `after`). Rows are kept only where an answer proves them whole:
    - a later key proves every group before it whole: those rows are kept and the next request starts at the last
      group's key again, since the answer may have been cut inside it;
    - an answer of one group that fills the limit is asked again with twice the limit (up to `max_limit`);
    - the range ends on an empty answer, or on a short one the caller confirmed to be all that was left (`whole`,
      e.g. from a count); a short answer is never the end by its length alone. An answer the caller found not whole
      and that proves nothing (one group, or none) is asked again. A short one-group answer the caller did not
      confirm is kept and the next request starts after its key: right for unique keys; with shared keys a caller
      should confirm (`short()` says when), since a cut inside the last group leaves no trace.
    Rows whose key cannot be read (None) travel with their neighbours: `skip` counts those kept at the end of one
    answer that may head the next one again.
    """

    key: Any
    limit: int
    max_limit: int
    after: bool = False
    base: int = 0  # the limit to come back to once past a large group (default: the first limit)
    cap: int = 0  # the most rows the server sent when asked for more: an answer that long counts as full
    skip: int = 0
    retries: int = 0  # answers in a row that were not whole and proved nothing
    done: bool = False

    MAX_RETRIES: ClassVar[int] = 6

    def __post_init__(self) -> None:
        self.base = self.base or self.limit

    @property
    def has_next_page(self) -> bool:
        return not self.done

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def short(self, keys: list[Any]) -> bool:
        """Whether this answer might be the end of the range (then `update_state` wants to know if it is `whole`)."""
        n = len(keys)
        if n >= self.limit:
            return False
        if self.cap and n >= self.cap:  # as long as the server's cap: short only if one group (nothing proven)
            first = next((k for k in keys[self._head(keys):] if k is not None), None)
            return first is None or first == self._tail(keys)
        return True

    def update_state(self, keys: list[Any], whole: bool | None = None) -> slice:
        """Judge one answer by its rows' keys in order (None: unreadable); returns the rows to keep."""
        n, head = len(keys), self._head(keys)
        if whole or (n == 0 and whole is None):
            self.done, self.retries = True, 0
            return slice(head, n)
        tail = self._tail(keys)
        last = next((i for i in range(n - 1, head - 1, -1) if keys[i] is not None and keys[i] < tail), None)
        if last is not None:  # more than one group: all but the last are whole
            stop = last + 1
            while keys[stop] is None:  # stops at the last group, which is readable
                stop += 1
            if whole is False:
                self.cap = max(self.cap, n)
            self.key, self.after, self.skip, self.limit, self.retries = tail, False, stop - last - 1, self.base, 0
            return slice(head, stop)
        if n >= self.limit:  # one group fills the answer: ask for more rows at once
            if self.limit >= self.max_limit:
                from syncd.errors import RequestRejected
                raise RequestRejected(f"more than {self.max_limit} rows share the key {tail!r}: keyset paging cannot pass")
            self.limit = min(self.max_limit, self.limit * 2)
            return slice(head, head)
        if whole is None and tail is not None:
            self.key, self.after, self.skip, self.limit, self.retries = tail, True, 0, self.base, 0
            return slice(head, n)
        self.retries += 1
        if self.retries >= self.MAX_RETRIES:
            from syncd.errors import MalformedResponse
            raise MalformedResponse(f"{self.retries} answers in a row from {self.key!r} ended short of what the "
                                    "server holds (cut, or capped inside one group)")
        return slice(head, head)

    def _head(self, keys: list[Any]) -> int:
        """Unreadable rows the last answer kept that head this one again."""
        head = 0
        while head < min(self.skip, len(keys)) and keys[head] is None:
            head += 1
        return head

    def _tail(self, keys: list[Any]) -> Any:
        return next((k for k in reversed(keys) if k is not None), None)
