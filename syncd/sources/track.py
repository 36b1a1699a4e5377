"""Trackers a connector keeps in its cursor: which latest values moved, and which alerts opened, changed or closed.

Both hold plain JSON (`state()`), keyed by text a vendor chose (ids, topics, keys): keys are made spoolable (a lone
surrogate escaped) since the spool stores cursors as UTF-8 JSON, and marks are compared as JSON would give them
back (a tuple is a list after a restart).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from syncd.sources.base import spoolable_text


def _json(mark: Any) -> Any:
    """`mark` as it reads back from the spool: tuples become lists (nested too)."""
    if isinstance(mark, tuple | list):
        return [_json(m) for m in mark]
    return mark


class ChangeTracker:
    """The mark (timestamp, value or state) last emitted per key of a latest-values feed: a record is emitted
    only when its mark moved (IoT Open and Ioto Store values, Ioto metric points, IXON agent and Navixy flow states).

    `state()` keeps every key; `state(seen_only=True)` only the keys `moved` was asked about since this tracker
    was made (a feed whose answer is the whole current set, where a key that left never returns as it was).
    """

    def __init__(self, state: Any = None) -> None:
        self.marks: dict[str, Any] = dict(state) if isinstance(state, dict) else {}
        self.seen: set[str] = set()

    def moved(self, key: str, mark: Any) -> bool:
        """Whether `key`'s mark differs from the one last emitted; remembers it (emit the record when True)."""
        key, mark = spoolable_text(key), _json(mark)
        self.seen.add(key)
        if key in self.marks and self.marks[key] == mark:
            return False
        self.marks[key] = mark
        return True

    def keep(self, wanted: Callable[[str, Any], bool]) -> None:
        """Forget the keys whose (key, mark) is not `wanted` (e.g. marks older than a window)."""
        self.marks = {k: m for k, m in self.marks.items() if wanted(k, m)}

    def state(self, seen_only: bool = False) -> dict[str, Any]:
        return {k: m for k, m in self.marks.items() if k in self.seen} if seen_only else dict(self.marks)


NEW, CHANGED, CLOSED = "new", "changed", "closed"


class AlertTracker:
    """Alerts by id: the open ones with the state they were last emitted in and their time, and the closed ones
    with their time until `forget` drops them (so a closed alert read again is not new again).

    `update` says what a sighting is: NEW (first seen; open, or already closed when `closed`), CHANGED (an open
    alert's state moved, or a closed one opened again), CLOSED (an open one closed), or None (nothing to emit).
    Ioto alerts, IXON alarm occurrences and Proxus alerts all read as this.
    """

    def __init__(self, state: Any = None) -> None:
        state = state if isinstance(state, dict) else {}
        self.open: dict[str, list[Any]] = {k: list(v) for k, v in (state.get("open") or {}).items()}
        self.closed: dict[str, int] = dict(state.get("closed") or {})

    def update(self, key: str, mark: Any, ts_ms: int, closed: bool = False) -> str | None:
        key, mark = spoolable_text(key), _json(mark)
        if key in self.open:
            if closed:
                del self.open[key]
                self.closed[key] = ts_ms
                return CLOSED
            if self.open[key][0] == mark:
                return None
            self.open[key] = [mark, ts_ms]
            return CHANGED
        if key in self.closed:
            if closed:
                return None
            del self.closed[key]
            self.open[key] = [mark, ts_ms]
            return CHANGED
        if closed:
            self.closed[key] = ts_ms
        else:
            self.open[key] = [mark, ts_ms]
        return NEW

    def oldest_open(self) -> int | None:
        """The time of the oldest open alert (a listing by time must start there to see it close), None if none."""
        return min((int(v[1]) for v in self.open.values()), default=None)

    def forget(self, before_ms: int, open_too: bool = False) -> None:
        """Drop closed alerts dated before `before_ms` (and open ones too, with `open_too`: outside a watch window)."""
        self.closed = {k: ts for k, ts in self.closed.items() if ts >= before_ms}
        if open_too:
            self.open = {k: v for k, v in self.open.items() if int(v[1]) >= before_ms}

    def state(self) -> dict[str, Any]:
        return {"open": dict(self.open), "closed": dict(self.closed)}
