"""Proxus against a world worse than the connector may assume, end to end: simulator → `syncd run --once`
(subprocess) → embedded ClickHouse, each time compared with the simulator's ground truth exactly.

Bodies cut exactly at a line boundary, a ClickHouse exception as the last line of a 200, a server row cap below
maxRows, a SQL guard that refuses OR/IN/tuples, and rows that land two hours late.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from syncd.errors import MalformedResponse, RequestRejected, Transient, VendorUnavailable
from syncd.events import Event
from syncd.sim.common import sims_in_thread
from syncd.sim.proxus import ProxusSim
from syncd.sim.proxus_sql import Query, SqlError
from syncd.sources.base import DeadLetter, Page
from syncd.sources.paging import KeysetPaginator
from syncd.sources.proxus import RECONCILE_EVERY_S, ProxusSource, proxus_error
from tests.helpers import Run, ch, stored_keys, syncd, truth_keys, write_config
from tests.test_proxus_quirks import TELEMETRY, FakeClock, connector, keys, raw_lines, truth


def _config(tmp_path: Path, sim: ProxusSim, extra: str = "") -> Path:
    cfg = write_config(tmp_path, [sim])
    cfg.write_text(cfg.read_text().replace('interval = "5s"', f'interval = "5s"\nrate = 50\n{extra}'))
    return cfg


def _once(cfg: Path) -> Run:
    return syncd("run", "--config", str(cfg), "--once")


def _telemetry_cursor(tmp_path: Path) -> Any:
    with sqlite3.connect(tmp_path / "data" / "state.db") as db:
        row = db.execute("SELECT cursor FROM cursors WHERE source = 'proxus-sim' AND stream = 'telemetry'").fetchone()
    return None if row is None else json.loads(row[0])


def _log_events(run: Run, name: str) -> list[dict[str, Any]]:
    out = []
    for line in run.stderr.splitlines():
        if f'"{name}"' in line and line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def _exact(tmp_path: Path, sim: ProxusSim) -> int:
    """Stored events == the simulator's ground truth, keys and values; returns how many."""
    truth, stored = truth_keys(sim), stored_keys(tmp_path / "data", "proxus")
    assert stored.keys() == truth.keys(), (len(stored), len(truth), sorted(truth.keys() - stored.keys())[:5])
    assert stored == truth
    return len(stored)


@contextmanager
def _cuts_spread(sim: ProxusSim, times: int) -> Iterator[None]:
    """Arm one more `cut_at_line` whenever the last one was served and another body went by (a thread)."""
    stop = threading.Event()

    def rearm() -> None:
        armed, mark = 0, len(sim.statements)
        while armed < times and not stop.wait(0.002):
            if sim.cut_at_line == 0 and len(sim.statements) >= mark + 2:
                sim.cut_at_line, armed, mark = 1, armed + 1, len(sim.statements)

    thread = threading.Thread(target=rearm, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_bodies_cut_exactly_at_a_line_boundary_lose_nothing(tmp_path: Path) -> None:
    sim = ProxusSim(seed=51, rows=6000, alerts=5, cut_at_line=4)  # the first page, then the count()s that judge it
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, "page_size = 500")
        with _cuts_spread(sim, times=10):  # then cuts all along the run
            run = _once(cfg)
        assert run.returncode == 0, run.stderr[-3000:]
        assert _exact(tmp_path, sim) == 6000 + 5
        (before,) = ch(tmp_path / "data", "SELECT count() FROM syncd.events")
        again = _once(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ch(tmp_path / "data", "SELECT count() FROM syncd.events") == [before]  # a rerun adds nothing
    cut = [sql for fault, sql in sim.worsened if fault == "cut_at_line"]
    pages = [sql for sql in cut if not sql.startswith("SELECT count()")]
    assert len(pages) >= 3 and len(cut) - len(pages) >= 3, cut  # pages cut, and count() answers cut to nothing


def test_an_exception_line_in_a_200_is_retried_and_then_exact(tmp_path: Path) -> None:
    sim = ProxusSim(seed=52, rows=4000, alerts=5, error_line=3)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, "page_size = 700")
        run = _once(cfg)
        assert sim.error_line == 0
    assert run.returncode == 0, run.stderr[-3000:]
    retries = [e for e in _log_events(run, "http.retry") if "MEMORY_LIMIT_EXCEEDED" in e["error"]]
    assert len(retries) == 3  # each failed body retried, none taken as rows or as the end
    assert _exact(tmp_path, sim) == 4000 + 5
    (dead,) = ch(tmp_path / "data", "SELECT count() FROM syncd.dead_letter")
    assert dead == [[0]]  # the exception line never became a dead letter


def test_a_persisting_exception_line_fails_the_run_and_leaves_the_cursor(tmp_path: Path) -> None:
    sim = ProxusSim(seed=53, rows=3000, alerts=5, late_rows=12, late_by=150)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, "page_size = 700")
        first = _once(cfg)
        assert first.returncode == 0, first.stderr[-3000:]
        assert _exact(tmp_path, sim) == 3000 - 12 + 5
        cursor = _telemetry_cursor(tmp_path)
        assert sim.land_late() == 12  # rows to find, then a server that keeps failing part-way
        sim.error_line = 1000
        failed = _once(cfg)
        assert failed.returncode != 0 and "telemetry" in failed.stdout + failed.stderr
        assert _telemetry_cursor(tmp_path) == cursor  # the cursor did not move past anything
        (status,) = ch(tmp_path / "data", "SELECT ok, error FROM syncd.sync_status FINAL WHERE stream = 'telemetry'")
        assert status[0][0] == 0 and "DB::Exception" in status[0][1]
        sim.error_line = 0
        later = _once(cfg)
    assert later.returncode == 0, later.stderr[-3000:]
    assert _exact(tmp_path, sim) == 3000 + 5  # the late rows too


def test_a_server_row_cap_below_max_rows_loses_nothing(tmp_path: Path) -> None:
    sim = ProxusSim(seed=54, rows=5000, alerts=5, row_cap=300)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, "page_size = 1000")
        run = _once(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _exact(tmp_path, sim) == 5000 + 5
    limits = {json.loads(r.body)["query"].rsplit(" ", 1)[1] for r in sim.requests if r.path.endswith("/execute")
              and "LIMIT" in json.loads(r.body)["query"]}
    assert "1000" in limits  # the client asked for more than the server gave


def test_a_strict_sql_guard_refuses_nothing_the_connector_sends(tmp_path: Path) -> None:
    sim = ProxusSim(seed=55, rows=5000, alerts=5, strict_guard=True, malformed_rows=20)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, "page_size = 450")
        run = _once(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _exact(tmp_path, sim) == len(truth_keys(sim))
    statements = sim.statements
    assert len(statements) > 11
    for sql in statements:  # what the brief guarantees: Time comparisons joined by AND
        try:
            Query(sql, 0, strict=True)
        except SqlError as err:
            raise AssertionError(f"{sql}: {err}") from None


def test_rows_two_hours_late_inside_late_window_arrive_on_a_later_run(tmp_path: Path) -> None:
    sim = ProxusSim(seed=56, rows=8000, history=4 * 3600, alerts=5, late_rows=30, late_by=7200)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, 'page_size = 900\nlate_window = "3h"\nreconcile_every = "1s"')
        first = _once(cfg)
        assert first.returncode == 0, first.stderr[-3000:]
        assert _exact(tmp_path, sim) == 8000 - 30 + 5
        assert sim.land_late() == 30  # inserted now, their Time two hours back: long behind the cursor
        second = _once(cfg)
        assert second.returncode == 0, second.stderr[-3000:]
        assert _exact(tmp_path, sim) == 8000 + 5
        found = _log_events(second, "proxus.late_rows")
        assert [e["late"] for e in found] == [30]  # counted exactly (Page.late → syncd_late_rows_total)
        (before,) = ch(tmp_path / "data", "SELECT count() FROM syncd.events")
        third = _once(cfg)
    assert third.returncode == 0, third.stderr[-3000:]
    assert _log_events(third, "proxus.late_rows") == []
    assert ch(tmp_path / "data", "SELECT count() FROM syncd.events") == [before]


# -- the same worse world with the connector in-process (clock injected): every page hit ----------------------

async def _sync(src: ProxusSource, sim: ProxusSim, arm: Callable[[ProxusSim], None], cursor: Any = None
                ) -> tuple[list[Event], list[DeadLetter], list[Page]]:
    """One run, fetch by fetch, arming a fault on the simulator before each fetch."""
    events: list[Event] = []
    dead: list[DeadLetter] = []
    pages: list[Page] = []
    for _ in range(3000):
        arm(sim)
        page = await src.fetch(TELEMETRY, cursor)
        events, dead, cursor = events + page.events, dead + page.dead, page.cursor
        pages.append(page)
        if page.done:
            return events, dead, pages
    raise AssertionError("the stream never caught up")


def _cut(sim: ProxusSim) -> None:
    sim.cut_at_line = 1


def _error(sim: ProxusSim) -> None:
    sim.error_line = 1


@pytest.mark.parametrize("arm", [_cut, _error], ids=["cut_at_line", "error_line"])
@pytest.mark.parametrize("page_size", [23, 100, 450])
async def test_a_fault_on_every_fetch_loses_nothing_and_reads_nothing_twice(arm: Callable[[ProxusSim], None],
                                                                            page_size: int) -> None:
    clock = FakeClock()
    sim = ProxusSim(seed=57, clock=clock, rows=2000, alerts=0, malformed_rows=40, keys_per_device=5)
    with sims_in_thread([sim]):
        broken = [line for line in raw_lines(sim) if "0000-00-00" in line or '"DeviceId":null' in line]
        async with connector(sim, clock, page_size=page_size) as src:
            events, dead, pages = await _sync(src, sim, arm)
            clock.t += 30
            again, dead_again, _ = await _sync(src, sim, arm, pages[-1].cursor)
    assert keys(events) == truth(sim) and len(events) == len(truth(sim))  # complete, and no row twice
    assert len(dead) == len(broken) >= 20  # each unreadable line once, none lost at a cut
    assert keys(again) <= truth(sim) and len(dead_again) <= len(broken)
    assert sum(p.late for p in pages) == 0


async def test_a_server_row_cap_inside_groups_grows_nothing_and_loses_nothing() -> None:
    sim = ProxusSim(seed=58, rows=3000, alerts=0, malformed_rows=30, row_cap=7)
    with sims_in_thread([sim]):
        async with connector(sim, page_size=200) as src:
            events, dead, _ = await _sync(src, sim, lambda s: None)
    assert keys(events) == truth(sim) and len(events) == len(truth(sim)) and len(dead) >= 15
    limits = {json.loads(r.body)["query"].rsplit(" ", 1)[1] for r in sim.requests
              if r.path.endswith("/execute") and "LIMIT" in json.loads(r.body)["query"]}
    assert limits == {"200"}  # a capped page counts as full: no growing, no looping


@pytest.mark.parametrize("late_window, found", [(None, False), ("3h", True)])
async def test_rows_two_hours_late_are_found_inside_late_window_and_counted(late_window: str | None,
                                                                          found: bool) -> None:
    clock = FakeClock()
    sim = ProxusSim(seed=59, clock=clock, rows=6000, history=5 * 3600, alerts=0, late_rows=17, late_by=7200)
    with sims_in_thread([sim]):
        async with connector(sim, clock, late_window=late_window) as src:
            first, _, pages = await _sync(src, sim, lambda s: None)
            assert keys(first) == truth(sim)
            sim.land_late()
            clock.t += 120  # before a reconcile is due (RECONCILE_EVERY_S): only the overlap is checked
            second, _, pages = await _sync(src, sim, lambda s: None, pages[-1].cursor)
            assert sum(p.late for p in pages) == 0 and not keys(second) & set(_late(sim))
            clock.t += RECONCILE_EVERY_S
            third, _, pages = await _sync(src, sim, lambda s: None, pages[-1].cursor)
            clock.t += RECONCILE_EVERY_S
            fourth, _, after = await _sync(src, sim, lambda s: None, pages[-1].cursor)
    late = set(_late(sim))
    assert len(late) == 17 and all(7000_000 < clock.t * 1000 - 1320_000 - ts < 7400_000 for *_, ts in late)
    if found:  # the reconcile found them, stored them once and counted them exactly
        assert late <= keys(third) and sum(p.late for p in pages) == 17
        assert fourth == [] and sum(p.late for p in after) == 0
    else:  # later than the default late window (LATE_WINDOW_S): documented as not found
        assert not late & keys(third) and sum(p.late for p in pages) == 0


def _late(sim: ProxusSim) -> list[tuple[str, str, str, int]]:
    return [(kind, device, metric, ts) for kind, _, device, metric, ts in sim.withheld]


# -- the paginator alone ----------------------------------------------------------------------------------

def test_keyset_paginator_keeps_only_what_an_answer_proves() -> None:
    p = KeysetPaginator(0, limit=5, max_limit=20)
    assert p.short([1, 1, 2]) and not p.short([1, 1, 2, 3, 3])
    assert p.update_state([1, 1, 2, 3, 3]) == slice(0, 3) and (p.key, p.after, p.limit) == (3, False, 5)
    assert p.update_state([3, 3, 4], whole=False) == slice(0, 2) and p.cap == 3  # a cut or a cap: not the end
    assert not p.short([4, 5, 5]) and p.short([4, 4, 4])  # as long as the cap: full, unless one group
    assert p.update_state([4, 4, 4], whole=False) == slice(0, 0) and p.retries == 1  # proves nothing: ask again
    assert p.update_state([4, 4, 4, 4], whole=True) == slice(0, 4) and p.done and not p.has_next_page
    q = KeysetPaginator(**{**p.state(), "done": False, "limit": 2, "base": 2})
    assert q.update_state([7, 7]) == slice(0, 0) and q.limit == 4  # one group fills the page: twice the limit
    assert q.update_state([7, 7, 7, 8]) == slice(0, 3) and (q.key, q.limit) == (8, 2)  # and back once past it
    r = KeysetPaginator(0, limit=4, max_limit=100)
    assert r.update_state([1, None, None, 2]) == slice(0, 3) and r.skip == 2  # unreadable rows travel with the kept
    assert r.update_state([None, None, 2, 3]) == slice(2, 3)  # ...and are not taken twice when they head the next
    assert r.update_state([]) == slice(0, 0) and r.done  # without a confirmation only an empty answer ends the range
    u = KeysetPaginator(0, limit=4, max_limit=100)
    assert u.update_state([5]) == slice(0, 1) and (u.key, u.after, u.done) == (5, True, False)  # unique keys go on
    with pytest.raises(RequestRejected):
        KeysetPaginator(0, limit=4, max_limit=4).update_state([1, 1, 1, 1])
    stuck = KeysetPaginator(0, limit=4, max_limit=8)
    with pytest.raises(MalformedResponse):
        for _ in range(KeysetPaginator.MAX_RETRIES):
            stuck.update_state([], whole=False)


def test_error_mapping_judges_the_whole_ndjson_body() -> None:
    url, row = "https://p/api/Telemetry/execute", b'{"Time":"2025-02-25 09:36:00.000","DeviceId":1,"Key":"k"}\n'
    text = b"Code: 241. DB::Exception: Memory limit (total) exceeded: ... (MEMORY_LIMIT_EXCEEDED) (version 23.8.2.7)\n"
    for body in (row * 3 + text, text, row + b'{"exception": "Code: 241. DB::Exception: ..."}\n'):
        err = proxus_error(200, {}, body, url)
        assert isinstance(err, VendorUnavailable) and isinstance(err, Transient) and "241" in str(err), body
    for body in (row + row[:20], row + b"<html>oops</html>\n", b"<html>\n" + row):  # cut mid-line; no NDJSON
        assert isinstance(proxus_error(200, {}, body, url), MalformedResponse), body
    quoting = b'{"Time":"2025-02-25 09:36:00.000","DeviceId":1,"Key":"k","StringValue":"DB::Exception"}\n'
    assert proxus_error(200, {}, row + quoting, url) is None and proxus_error(200, {}, b"", url) is None
