"""What every connector is: it lists its streams and fetches one page at a time from a cursor.

A source never writes, commits or sleeps for timing: the engine (scheduler, spool, throttle) does.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from syncd.events import Event
from syncd.http import VendorClient, default_error
from syncd.settings import SourceBase

M = TypeVar("M", bound=BaseModel)


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


class Source(ABC):
    """A configured vendor account; subclasses implement `discover` and `fetch`."""

    vendor: ClassVar[str]
    default_streams: ClassVar[tuple[str, ...]]
    default_rate: ClassVar[float]
    default_burst: ClassVar[int]
    map_error = staticmethod(default_error)  # how this vendor's HTTP errors become ours
    instance = "syncd-0"  # the daemon instance (set by the engine): stable ids such as MQTT client ids derive from it

    def __init__(self, config: SourceBase, client: VendorClient, clock: Callable[[], float] = time.time) -> None:
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

    def event(self, kind: str, tenant: str, device: str, metric: str, ts_ms: int, value: float | None = None,
              text: str | None = None, attrs: dict[str, str] | None = None) -> Event:
        return Event(
            source=self.name, vendor=self.vendor, kind=kind, tenant=tenant, device=device, metric=metric,
            ts_ms=ts_ms, value=value, text=text, attrs=attrs or {},
        )


def valid(model: type[M], records: Iterable[Any], dead: list[DeadLetter],
          context: Callable[[Any], Any] | None = None) -> Iterator[M]:
    """The records that validate as `model`; every other one becomes a dead letter naming the bad field.

    `context` wraps a failed record for the dead letter (e.g. with the agent it came from).
    """
    for raw in records:
        try:
            yield model.model_validate(raw)
        except ValidationError as err:
            dead.append(dead_letter(context(raw) if context else raw, err))


def dead_letter(record: Any, err: Exception) -> DeadLetter:
    """A dead letter for a record that failed validation, naming the bad field."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<record>"
        reason = f"{where}: {first['msg']}"
    else:
        reason = f"{err.__class__.__name__}: {err}"
    try:
        payload = orjson.dumps(record, default=str).decode()
    except TypeError:
        payload = repr(record)
    return DeadLetter(reason, payload)
