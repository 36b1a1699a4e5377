"""`syncd backfill` against the IoT Open simulator's history: exact, repeatable, resumable, beside the live state."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd.backfill import BackfillError, Range, iso, job_key, matches, parse_when
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from tests.helpers import ch, popen_syncd, write_config
from tests.mqtt_helpers import wait_for

DAY_MS = 86_400_000
# run_backfill in its own process (the embedded store is one per process), progress lines on stderr
BACKFILL = ("import sys; from syncd.settings import load; from syncd.backfill import run_backfill; "
            "sys.exit(run_backfill(load(sys.argv[1]), sys.argv[2], sys.argv[3] or None, sys.argv[4], sys.argv[5] or None))")


def backfill(cfg: Path, since: str, until: str = "", stream: str = "", source: str = "iotopen-sim"
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BACKFILL, str(cfg), source, stream, since, until],
                          capture_output=True, text=True, timeout=300)


def popen_backfill(cfg: Path, since: str, until: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", BACKFILL, str(cfg), "iotopen-sim", "", since, until],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def history_sim(seed: int, installations: int = 2, log_points: int = 4000) -> IotOpenSim:
    return IotOpenSim(seed=seed, installations=installations, topics_per_installation=4, log_points=log_points,
                      history=4 * 86400.0)


def two_days(sim: IotOpenSim) -> Range:
    """[3 days ago, 1 day ago) of the simulator's history, on whole seconds."""
    since = (int(sim.anchor * 1000) - 3 * DAY_MS) // 1000 * 1000
    return Range(since, since + 2 * DAY_MS)


def truth_in(sim: IotOpenSim, rng: Range) -> set[tuple[str, str, str, int, float | None, str | None]]:
    return {(t.tenant, t.device, t.metric, t.ts_ms, t.value, t.text) for t in sim.ground_truth()
            if t.kind == "log" and rng.since_ms <= t.ts_ms < rng.until_ms}


def stored_in(data: Path, rng: Range | None = None) -> set[tuple[str, str, str, int, float | None, str | None]]:
    where = f"WHERE ts >= fromUnixTimestamp64Milli({rng.since_ms}) AND ts < fromUnixTimestamp64Milli({rng.until_ms})" \
        if rng else ""
    (rows,) = ch(data, f"SELECT tenant, device, metric, toUnixTimestamp64Milli(ts), value, text, kind "
                       f"FROM syncd.events FINAL {where}")
    assert all(r[6] == "log" for r in rows)
    return {(r[0], r[1], r[2], int(r[3]), r[4], r[5]) for r in rows}


def counts(data: Path) -> list[int]:
    """[count() FINAL, uniqExact(event_id)] of the events."""
    final, unique = ch(data, "SELECT count() FROM syncd.events FINAL", "SELECT uniqExact(event_id) FROM syncd.events")
    return [final[0][0], unique[0][0]]


def log_requests(sim: IotOpenSim, start: int = 0) -> list[dict[str, str]]:
    return [dict(r.query) for r in sim.requests[start:] if r.path.startswith("/api/v3beta/log/")]


def jobs(data: Path) -> dict[str, Any]:
    """The backfill's jobs, read as another process would (the spool is SQLite WAL)."""
    path = data / "backfill.db"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {stream: orjson.loads(cursor) for stream, cursor in db.execute("SELECT stream, cursor FROM cursors")}
    except sqlite3.OperationalError:  # the backfill has not created its tables yet
        return {}
    finally:
        db.close()


def live_cursors(data: Path) -> list[Any]:
    """The daemon's cursors in state.db, every column (their `updated` time too)."""
    if not (data / "state.db").exists():
        return []
    db = sqlite3.connect(f"file:{data / 'state.db'}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT source, stream, cursor, updated FROM cursors ORDER BY source, stream"))
    except sqlite3.OperationalError:  # the daemon has not created its tables yet
        return []
    finally:
        db.close()


# -- the range is exact, and filling it again adds nothing -----------------------------------------------------------

def test_a_two_day_range_is_filled_exactly_and_filling_it_again_adds_nothing(tmp_path: Path) -> None:
    sim = history_sim(seed=41)
    rng = two_days(sim)
    data = tmp_path / "data"
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim], "page_size = 200\n")
        first = backfill(cfg, iso(rng.since_ms), iso(rng.until_ms))
        assert first.returncode == 0, first.stderr[-3000:]
        reads = len(log_requests(sim))
        truth = truth_in(sim, rng)
        assert 1500 < len(truth) < 2500  # two of the four days
        assert stored_in(data) == truth  # nothing outside the range, nothing missing, values and texts as served
        assert counts(data) == [len(truth), len(truth)]
        # the same command again reads the range again (the job had finished) and stores no row twice
        before = len(sim.requests)
        second = backfill(cfg, iso(rng.since_ms), iso(rng.until_ms))
        assert second.returncode == 0, second.stderr[-3000:]
        assert len(log_requests(sim, before)) == reads
    assert counts(data) == [len(truth), len(truth)]
    (raw,) = ch(data, "SELECT count() FROM syncd.events")
    assert raw == [[2 * len(truth)]]  # inserted twice, one of each after FINAL
    assert not (data / "state.db").exists()  # the live state was never opened
    # what it says: the streams it left out and why, the range, the budget, a line per stream when it ends
    assert "not backfilled: status streams (2)" in first.stdout
    assert f"filling 2 stream(s) over {rng}; at most 5 req/s (50% of the source's rate, 50% kept" in first.stdout
    for inst in sim.insts:
        per = sum(1 for t in truth if t[0] == str(inst["id"]))
        assert f"backfill iotopen-sim log/{inst['id']}: 100% {per:,} rows " in first.stderr, first.stderr
    assert f"backfill iotopen-sim {rng}: 2 done; {len(truth):,} rows in range (live cursors untouched)" in first.stdout


# -- Ctrl-C, then a crash mid-way: the same command continues where it stopped ----------------------------------------

def test_interrupted_then_killed_the_same_command_continues_where_it_stopped_exactly(tmp_path: Path) -> None:
    sim = history_sim(seed=42, installations=1)
    rng = two_days(sim)
    data = tmp_path / "data"
    since, until = iso(rng.since_ms), iso(rng.until_ms)
    key = job_key(f"log/{sim.insts[0]['id']}", rng)

    def stopped_after_a_page(sig: signal.Signals, pages: int) -> tuple[dict[str, Any], int, int, str]:
        """Start the backfill, send `sig` once more than `pages` pages are committed: the job, the requests before
        the run, its exit code and output."""
        before = len(sim.requests)
        proc = popen_backfill(cfg, since, until)
        try:
            wait_for(lambda: jobs(data).get(key, {}).get("pages", 0) > pages, timeout=120, every=0.01)
        finally:
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=60)
        job = jobs(data)[key]
        assert not job["done"], "the backfill ended before the signal: the test needs a longer range"
        return job, before, proc.returncode, out

    with sims_in_thread([sim]):
        # 100 rows a page at 5 requests/s (half of rate 10, burst 1): about 20 pages, 4 s of paging
        cfg = write_config(tmp_path, [sim], "page_size = 100\nrate = 10\nburst = 1\n")
        interrupted, _, ctrl_c, said = stopped_after_a_page(signal.SIGINT, 0)
        killed, second, _, _ = stopped_after_a_page(signal.SIGKILL, interrupted["pages"])
        after_ctrl_c = log_requests(sim, second)
        third = len(sim.requests)
        again = backfill(cfg, since, until)
        assert again.returncode == 0, again.stderr[-3000:]
        resumed = log_requests(sim, third)
    assert ctrl_c == 130 and "interrupted; run the same command again to continue where it stopped" in said, said
    assert "filling 1 stream(s)" in said
    # each run asked from the offset the one before had committed: nothing before it was read again
    assert int(after_ctrl_c[0]["offset"]) == interrupted["cursor"]["pager"]["offset"] == interrupted["pages"] * 100 > 0
    pager = killed["cursor"]["pager"]
    assert pager["offset"] == killed["pages"] * 100 and pager["total"] > pager["offset"]
    assert [int(q["offset"]) for q in resumed] == list(range(pager["offset"], pager["total"], 100))
    assert len(resumed) == math.ceil((pager["total"] - pager["offset"]) / 100)
    assert "continuing 1 stream(s)" in again.stdout
    truth = truth_in(sim, rng)
    assert stored_in(data) == truth
    assert counts(data) == [len(truth), len(truth)]
    assert jobs(data)[key]["done"] and jobs(data)[key]["rows"] == len(truth)


# -- beside a running daemon --------------------------------------------------------------------------------------------

def test_refused_while_a_daemon_holds_the_embedded_store_and_the_live_cursors_never_move(tmp_path: Path) -> None:
    sim = history_sim(seed=43)
    rng = two_days(sim)
    data = tmp_path / "data"
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        daemon = popen_syncd("run", "--config", str(cfg))
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(daemon.stderr or ()), daemon=True)
        reader.start()
        try:
            wait_for(lambda: any('"clickhouse.created"' in line for line in lines), timeout=120)
            wait_for(lambda: len(live_cursors(data)) == 4, timeout=120)  # status and log of both installations
            busy = backfill(cfg, iso(rng.since_ms), iso(rng.until_ms))
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
            reader.join(timeout=10)
        assert daemon.returncode == 0, "".join(lines)[-3000:]
        assert busy.returncode == 1
        assert "in use by another process" in busy.stderr and "Stop the daemon" in busy.stderr, busy.stderr
        assert "ClickHouse server" in busy.stderr and "Traceback" not in busy.stderr
        assert jobs(data) == {}  # it fetched nothing
        live = live_cursors(data)
        assert len(live) == 4
        done = backfill(cfg, iso(rng.since_ms), iso(rng.until_ms))
        assert done.returncode == 0, done.stderr[-3000:]
        assert live_cursors(data) == live  # not one cursor moved, not even its `updated` time
        truth = truth_in(sim, rng)
    assert stored_in(data, rng) == truth
    total, unique = counts(data)
    assert total == unique


# -- what it accepts --------------------------------------------------------------------------------------------------

def test_dates_and_stream_names() -> None:
    now = 1_700_000_000_000
    assert parse_when("7d", now) == now - 7 * DAY_MS
    assert parse_when("36h", now) == now - 36 * 3_600_000
    assert parse_when("now", now) == now
    assert parse_when("2024-05-01", now) == 1_714_521_600_000
    assert parse_when("2024-05-01T12:00:00+02:00", now) == 1_714_557_600_000
    with pytest.raises(BackfillError, match="is no date"):
        parse_when("yesterday", now)
    assert matches("log/10", "log") and matches("log/10", "log/*") and matches("log/10", "*")
    assert matches("telemetry", "telemetry") and not matches("status/10", "log")


def test_what_cannot_be_backfilled_is_refused_with_the_reason(tmp_path: Path) -> None:
    sim = history_sim(seed=44, installations=1, log_points=200)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        status = backfill(cfg, "2d", "1d", stream="status")
        backwards = backfill(cfg, "1d", "2d")
        future = backfill(cfg, "1d", "2200-01-01")
        unknown = backfill(cfg, "2d", source="nope")
    assert status.returncode == 2 and "not backfilled: status streams (1)" in status.stdout
    assert "no log stream of iotopen-sim matches 'status' (streams: log/" in status.stderr
    assert backwards.returncode == 2 and "--since must come before --until" in backwards.stderr
    assert future.returncode == 2 and "is in the future; leave it out to fill up to now" in future.stderr
    assert unknown.returncode == 2 and "no source named 'nope' in the configuration (sources: iotopen-sim)" in unknown.stderr
    assert log_requests(sim) == []
