"""Paginators: small objects that hold a listing's paging state and decide when a range is really finished.

In the spirit of dlt's `paginators.py`: each one says what to ask for next (`params()` or its fields), judges an
answer (`update_state`) and answers `has_next_page`. Every state is plain JSON (`state()`, `Cls(**state)`), so a
paginator can live in a stream's cursor and resume after a restart. The common rule: a page that could be a cut
(short of what was asked, or of what the vendor said it holds) is never the end by itself; only the vendor's own
end marker (an empty page, a missing next cursor, a reached total) or a caller's confirmation ends a range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import orjson

from syncd.errors import MalformedResponse, RequestRejected


class Paginator(Protocol):
    @property
    def has_next_page(self) -> bool: ...

    def state(self) -> dict[str, Any]: ...


class _Pager:
    """What every paginator answers: whether there is a next page, and its state as plain JSON."""

    done: bool

    @property
    def has_next_page(self) -> bool:
        return not self.done

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


async def collect(pager: Paginator, fetch: Callable[[Any], Awaitable[list[Any]]]) -> list[Any]:
    """Every item of a listing: `fetch(pager)` asks for one page (and updates the pager) until it has no next page."""
    items: list[Any] = []
    while True:
        items += await fetch(pager)
        if not pager.has_next_page:
            return items


@dataclass
class OffsetPaginator(_Pager):
    """offset + limit paging with a total the vendor reports (IoT Open's v3 log, Navixy's mapping list).

    The range ends on an empty page or once the offset reaches the total; a short page before the total is a cut
    (or a server cap below the limit) and the next page asks from where it ended. With `confirm_empty`, only an
    empty page ends it (for listings whose total may be stale).
    """

    limit: int
    offset: int = 0
    total: int | None = None
    done: bool = False
    confirm_empty: bool = False

    def params(self) -> dict[str, int]:
        return {"offset": self.offset, "limit": self.limit}

    def update_state(self, count: int, total: Any, where: str = "") -> None:
        """Judge a page of `count` items answered with `total`; a total that is no count is a malformed page."""
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise MalformedResponse(f"{where}: a page needs a numeric total (got {str(total)[:40]})".lstrip(": "))
        self.offset += count
        self.total = total
        self.done = count == 0 or (not self.confirm_empty and self.offset >= total)


@dataclass
class CursorPaginator(_Pager):
    """An opaque next-page cursor from the answer (Ioto's `next`, IXON's `moreAfter`): the range ends when the answer
    carries none. A cursor of another type is malformed (a page that cannot say what follows is no last page), or,
    with `json_objects`, a JSON object passed back as its text (Ioto types `next` as an object in one document)."""

    cursor: str | None = None
    done: bool = False
    json_objects: bool = False

    def update_state(self, following: Any, where: str = "") -> None:
        if following is not None and not isinstance(following, str):
            if not self.json_objects:
                raise MalformedResponse(f"{where}: the next-page cursor is not a string".lstrip(": "),
                                        body=str(following)[:200])
            following = orjson.dumps(following).decode()
        self.cursor = following or None
        self.done = self.cursor is None


@dataclass
class ODataPaginator(_Pager):
    """OData paging: `$top`/`$skip` windows in key order, each followed through the server's `@odata.nextLink`.

    A server page size below `$top` shows up as a next link inside the window. The listing ends with a window
    that, links followed, held fewer than `top` items; a window of `top` is never the last by its length (the
    next one may be empty), and more than `top` means the server ignored `$top` (then the links carried it all).
    """

    top: int
    skip: int = 0
    link: str | None = None  # the next link inside the current window
    got: int = 0  # items of the current window so far
    done: bool = False

    def params(self) -> dict[str, str] | None:
        """The window's query when no next link is to be followed (then the link is the whole request)."""
        return None if self.link else {"$top": str(self.top), "$skip": str(self.skip)}

    def update_state(self, count: int, link: Any, where: str = "") -> None:
        if link is not None and not isinstance(link, str):
            raise MalformedResponse(f"{where}: @odata.nextLink is not a URL".lstrip(": "), body=str(link)[:200])
        self.got += count
        if link:
            self.link = link
            return
        self.link = None
        if self.got != self.top:  # a short window is the last; more than $top means $top was ignored
            self.done = True
            return
        self.skip, self.got = self.skip + self.got, 0


@dataclass
class TimeKeyPaginator(_Pager):
    """Keyset paging by a time no two rows share (IXON DataList: one point per tag and time), `limit` rows per answer.

    Each request asks from `key` on, inclusive (the vendor's `start`): once the range `moved`, rows at or before
    `key` were read already and the caller skips them. A full answer whose newest key moved on is continued from that
    key; any other answer ends the range: a short one (the vendor had no more), and a full one that moved nothing
    (every row unreadable, or past the range's end), which would ask the same again for ever. A cut body is no
    answer here: it fails to parse and is retried whole.
    """

    key: int
    limit: int
    moved: bool = False
    done: bool = False

    def update_state(self, count: int, newest: int | None) -> None:
        """Judge an answer of `count` rows whose newest readable key within the range is `newest`."""
        if count >= self.limit and newest is not None and newest > self.key:
            self.key, self.moved = newest, True
        else:
            self.done = True


# -- keyset paging under a silent row cap (DESIGN.md "A range ends only when the vendor says so") -----------------

@dataclass
class KeysetPaginator(_Pager):
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
                raise RequestRejected(f"more than {self.max_limit} rows share the key {tail!r}: keyset paging cannot pass")
            self.limit = min(self.max_limit, self.limit * 2)
            return slice(head, head)
        if whole is None and tail is not None:
            self.key, self.after, self.skip, self.limit, self.retries = tail, True, 0, self.base, 0
            return slice(head, n)
        self.retries += 1
        if self.retries >= self.MAX_RETRIES:
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
