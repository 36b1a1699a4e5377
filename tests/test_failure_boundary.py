"""The job boundary decides: unexpected exceptions fail runs visibly, a refused key recovers by itself,
Retry-After is capped, and the sinks isolate poison instead of pausing on it."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from syncd.app import Daemon
from syncd.errors import RowsRefused
from syncd.http import TokenBucket, VendorClient
from syncd.observability import Metrics
from syncd.scheduler import Syncer
from syncd.settings import IotOpenSource, Settings
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sinks.base import Drainer, Sink
from syncd.sources.base import Page, Source, Stream
from syncd.spool import Batch, Spool
from tests.conftest import free_port
from tests.helpers import ch, logged, popen_syncd, status_row, stored_keys, syncd, syncd_status, truth_keys, write_config
from tests.mqtt_helpers import Subscriber, metrics, wait_for

# -- a connector of our own making, to throw what no real vendor should (but one day will) -----------------


class Surprising(Source):
    """Two streams: `good` pages through 3 pages, `bad` raises `exc` on fetch (until `exc` is cleared)."""

    vendor = "iotopen"
    default_streams = ("log",)
    default_rate, default_burst = 100.0, 10

    def __init__(self, name: str, *, exc: BaseException | None = None, discover_exc: BaseException | None = None) -> None:
        cfg = IotOpenSource(name=name, vendor="iotopen", api_key="k" * 8)
        super().__init__(cfg, client=None)  # type: ignore[arg-type]  # this source never talks HTTP
        self.exc, self.discover_exc = exc, discover_exc

    async def discover(self) -> list[Stream]:
        if self.discover_exc is not None:
            raise self.discover_exc
        return [Stream("good", "log", "t"), Stream("bad", "log", "t")]

    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        if stream.name == "bad" and self.exc is not None:
            raise self.exc
        n = (cursor or 0) + 1
        ev = self.event("log", "t", "d", stream.name, 1_700_000_000_000 + n, value=float(n))
        return Page([ev], n, done=n >= 3)


def _syncer(tmp: Path, newest: Any = None) -> tuple[Syncer, Spool, Metrics]:
    spool, metrics_ = Spool(tmp / "state.db"), Metrics()
    spool.register_sinks(["clickhouse"])

    async def room() -> None:
        return None

    return Syncer(spool, metrics_, instance="t", wake=lambda: None, room=room, newest=newest), spool, metrics_


def _status_rows(spool: Spool) -> list[list[Any]]:
    batch = spool.next_batch("clickhouse", 10**6)
    assert batch is not None
    return [s for p in batch.pages for s in p.get("s", ())]


async def test_an_unexpected_exception_fails_the_run_visibly_and_the_next_run_recovers(tmp_path: Path) -> None:
    syncer, spool, m = _syncer(tmp_path)
    source = Surprising("odd", exc=KeyError("total"))
    syncer.add_source(source)
    await syncer.discover("odd")
    with capture_logs() as logs:
        good = await syncer.run_stream("odd", "good")
        bad = await syncer.run_stream("odd", "bad")
        again = await syncer.run_stream("odd", "bad")  # still failing: no second "failing" line
    assert not good.failing and good.events == 3
    assert bad is again and bad.failing and bad.error == "KeyError: 'total'"
    assert spool.get_cursor("odd", "good") == 3 and spool.get_cursor("odd", "bad") is None  # cursor untouched
    assert m.get("syncd_stream_errors_total", source="odd", stream="bad", error="KeyError") == 2
    assert [e["event"] for e in logs].count("stream.failing") == 1
    assert [e["event"] for e in logs].count("stream.unexpected_error") == 1  # the traceback, once
    finished = [e for e in logs if e["event"] == "sync.finished" and e.get("ok") is False]
    assert len(finished) == 2
    status = _status_rows(spool)
    bad_rows = [s for s in status if s[2] == "bad"]
    assert [s[4] for s in bad_rows] == [0, 0] and all(s[10] == "KeyError: 'total'" for s in bad_rows)
    assert [s[4] for s in status if s[2] == "good"] == [1]
    source.exc = None
    with capture_logs() as logs:
        fixed = await syncer.run_stream("odd", "bad")
    assert not fixed.failing and spool.get_cursor("odd", "bad") == 3
    assert [e["event"] for e in logs].count("stream.recovered") == 1
    assert syncer.fetching == 0 and not spool.expecting()  # a failed fetch leaves no commit waiting for its page
    spool.close()


class Cursorless(Surprising):
    """20 streams of their own (kind, tenant), each one page; `keep=False` leaves them without a cursor."""

    keep = True

    async def discover(self) -> list[Stream]:
        return [Stream(f"log/{i}", "log", f"t{i}") for i in range(20)]

    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        return Page([], 1 if self.keep else None, done=True)


async def test_streams_starting_without_a_cursor_ask_the_store_once_not_once_each(tmp_path: Path) -> None:
    """state.db lost under 10,000 streams: the streams that start together ask the sink for their resume point in
    one query, all resume from its answer; a failed answer sends every one of them to `start`, and the next
    streams to start ask again."""
    asked: list[str] = []
    release = asyncio.Event()

    async def newest(source: str) -> dict[tuple[str, str], int]:
        asked.append(source)
        await release.wait()
        if source == "down":
            raise ConnectionError("store unreachable")
        return {("log", f"t{i}"): 1_700_000_000_000 + i for i in range(20)}

    syncer, spool, _ = _syncer(tmp_path, newest)
    reached, all_there = 0, asyncio.Event()
    resume_point = syncer._resume_point

    async def counted(st: Any, stream: Stream) -> None:
        nonlocal reached
        reached += 1
        if reached == 20:
            all_there.set()  # its waiter wakes on a later turn of the loop, once this one waits below too
        await resume_point(st, stream)  # runs up to its first wait: the query, or the one already out

    syncer._resume_point = counted  # type: ignore[method-assign]

    async def round_of(name: str) -> list[Any]:
        nonlocal reached
        reached = 0
        release.clear()
        all_there.clear()
        runs = [asyncio.create_task(syncer.run_stream(name, s)) for s in syncer.sources[name].streams]
        await asyncio.wait_for(all_there.wait(), 30)
        asked_now = list(asked)
        release.set()
        await asyncio.wait_for(asyncio.gather(*runs), 30)
        return asked_now

    up, down = Cursorless("up"), Cursorless("down")
    down.keep = False
    for source in (up, down):
        syncer.add_source(source)
        await syncer.discover(source.name)
    with capture_logs() as logs:
        assert await round_of("up") == ["up"]  # 20 streams waiting, one question out
    assert up.resume == {f"log/{i}": 1_700_000_000_000 + i - 3_600_000 for i in range(20)}
    assert [e["event"] for e in logs].count("stream.resumed_from_sink") == 20
    with capture_logs() as logs:
        assert await round_of("down") == ["up", "down"]
    assert down.resume == {} and [e["event"] for e in logs].count("stream.resume_point_unknown") == 20
    assert not any(syncer.states[("down", s)].failing for s in syncer.sources["down"].streams)  # read from `start`
    assert await round_of("down") == ["up", "down", "down"]  # asked again, once
    spool.close()


async def test_the_daemon_logs_runs_worth_a_line_and_sums_the_rest_per_source(tmp_path: Path) -> None:
    """Scheduled (the daemon): a stream's first run, a failure, a recovery are `sync.finished` lines at info; a
    routine run is at debug, counted in the source's `sync.progress` line."""
    syncer, spool, _ = _syncer(tmp_path)
    source = Surprising("odd", exc=KeyError("total"))
    syncer.add_source(source)
    await syncer.discover("odd")
    syncer.quiet_runs = True  # what `schedule()` sets
    with capture_logs() as logs:
        for _ in range(3):
            await syncer.run_stream("odd", "good")  # first run at info, then two routine runs
        await syncer.run_stream("odd", "bad")  # fails: info
        await syncer.run_stream("odd", "bad")  # still failing: info
        source.exc = None
        await syncer.run_stream("odd", "bad")  # recovers: info
        await syncer.run_stream("odd", "bad")  # routine
        await syncer.progress()
        await syncer.progress()  # nothing ran since: counts are zero, the streams still named
    lines = [(e["log_level"], e["ok"], e["events"]) for e in logs if e["event"] == "sync.finished"]
    # `good`: pages 1..3 (an event each) on its first run, then one new page a run; `bad` likewise once it recovers
    assert lines == [("info", True, 3), ("debug", True, 1), ("debug", True, 1),
                     ("info", False, 0), ("info", False, 0), ("info", True, 3), ("debug", True, 1)]
    progress = [e for e in logs if e["event"] == "sync.progress"]
    assert [(e["runs"], e["failed"], e["events"], e["pages"], e["streams"], e["failing_streams"]) for e in progress] \
        == [(7, 2, 9, 9, 2, 0), (0, 0, 0, 0, 2, 0)]
    spool.close()


async def test_a_surprise_in_discovery_stays_in_its_source(tmp_path: Path) -> None:
    syncer, spool, m = _syncer(tmp_path)
    syncer.add_source(Surprising("broken", discover_exc=ValueError("1 validation error for Installation")))
    syncer.add_source(Surprising("fine"))
    found = await asyncio.gather(syncer.discover("broken"), syncer.discover("fine"))
    assert found[0] == [] and [s.name for s in found[1]] == ["good", "bad"]
    assert syncer.sources["broken"].discovery_error == "discovery: ValueError: 1 validation error for Installation"
    assert m.get("syncd_discovery_errors_total", source="broken", error="ValueError") == 1
    assert (await syncer.run_stream("fine", "good")).events == 3
    spool.close()


async def test_once_names_each_failed_stream_and_source(tmp_path: Path) -> None:
    settings = Settings(syncd={"data_dir": str(tmp_path), "http": ""})
    daemon = Daemon(settings, sinks=[])
    await daemon.start()
    try:
        daemon.syncer.add_source(Surprising("odd", exc=ZeroDivisionError("division by zero")))
        daemon.syncer.add_source(Surprising("broken", discover_exc=RuntimeError("disk full")))
        failed = await daemon.run_once()
    finally:
        await daemon.stop(flush_timeout=5)
    assert failed == {"broken": "discovery: RuntimeError: disk full",
                      "odd bad": "ZeroDivisionError: division by zero"}


# -- credentials and Retry-After ---------------------------------------------------------------------------


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_refused_key_is_rechecked_and_the_source_resumes_without_a_restart(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=31, installations=2, topics_per_installation=3, log_points=300)
    port = free_port()
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('http = ""', f'http = "127.0.0.1:{port}"')
                       .replace('interval = "5s"', 'interval = "2s"') + 'auth_recheck = "1s"\n')
        sim.faults.expired = True  # the key is refused from the first request
        daemon = popen_syncd("run", "--config", str(cfg))
        try:
            wait_for(lambda: _readyz(port)[0] == 503 and "auth_failed" in _readyz(port)[1], timeout=60)
            assert metrics(port).get('syncd_source_auth_failed{source="iotopen-sim"}') == 1
            status = syncd_status(cfg)
            assert status_row(status.stdout, "sources", source="iotopen-sim")["auth"] == "auth_failed"
            sim.faults.expired = False  # the operator fixed the key
            total = len(sim.ground_truth())
            wait_for(lambda: metrics(port).get('syncd_events_total{kind="log",source="iotopen-sim"}', 0)
                     + metrics(port).get('syncd_events_total{kind="status",source="iotopen-sim"}', 0) == total,
                     timeout=90)
            assert _readyz(port)[0] == 200
            assert metrics(port).get('syncd_source_auth_failed{source="iotopen-sim"}') == 0
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=120)
        assert daemon.returncode == 0, err[-2000:]
    assert err.count('"source.failed"') == 1 and err.count('"source.auth_recovered"') == 1
    assert stored_keys(tmp_path / "data", "iotopen").keys() == truth_keys(sim).keys()


async def test_retry_after_of_a_day_is_capped_with_a_warning_naming_the_source() -> None:
    sim = IotOpenSim(seed=32, installations=1, log_points=10)
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    with sims_in_thread([sim]):
        sim.faults.update({"storm_429": 1, "retry_after": 86400})
        bucket = TokenBucket(10, 5, clock=lambda: now[0], sleep=fake_sleep)
        async with aiohttp.ClientSession() as session:
            client = VendorClient(session, bucket, timeout=10, sleep=fake_sleep, name="lynx-prod", max_retry_after=900)
            with capture_logs() as logs:
                resp = await client.request("GET", f"{sim.url}/api/v2/installationinfo",
                                            headers={"X-API-Key": sim.api_key})
    assert resp.status == 200
    assert 900 <= now[0] < 901  # waited the cap, not a day
    capped = [e for e in logs if e["event"] == "http.retry_after_capped"]
    assert len(capped) == 1 and capped[0]["source"] == "lynx-prod" and capped[0]["retry_after"] == 86400


# -- sinks isolate poison ----------------------------------------------------------------------------------


class Picky(Sink):
    """Refuses any batch holding a row whose metric starts with 'poison'; fails transiently on chosen writes."""

    name = "picky"

    def __init__(self, fail_on_writes: set[int] | None = None) -> None:
        self.writes = 0
        self.fail_on = fail_on_writes or set()
        self.landed: dict[str, list[int]] = {}  # token -> event ids, for every successful write

    async def write(self, batch: Batch) -> int | None:
        self.writes += 1
        if self.writes in self.fail_on:
            raise ConnectionResetError("peer went away")
        rows = [r for p in batch.pages for r in p.get("e", ())]
        bad = [r for r in rows if r[6].startswith("poison")]
        if bad:
            raise RowsRefused(f"metric: {bad[0][6]} is not allowed")
        ids = [r[0] for r in rows]
        assert self.landed.setdefault(batch.token, ids) == ids  # a retried token always carries the same rows
        return 0


def _row(i: int, metric: str = "m") -> list[Any]:
    return [i, "src", "iotopen", "log", "t", "d", metric, 1_700_000_000_000 + i, float(i), None, {}]


@pytest.mark.parametrize("fail_on", [set(), {3, 7}])
async def test_the_drainer_splits_a_refused_batch_dead_letters_the_poison_and_delivers_the_rest(
        tmp_path: Path, fail_on: set[int]) -> None:
    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["picky"])
    poison = {17, 600, 601}
    for page in range(10):
        rows = [_row(i, "poison" if i in poison else "m") for i in range(page * 100, page * 100 + 100)]
        spool.commit_page("src", "log/1", {"src": "src", "vendor": "iotopen", "stream": "log/1", "e": rows,
                                           "s": [["status-row"]] if page == 0 else []}, page)
    sink = Picky(fail_on)
    sink.batch_rows = 10**6
    drainer = Drainer(sink, spool, Metrics(), max_backoff=0.01)
    assert await drainer.flush(deadline=asyncio.get_running_loop().time() + 60, give_up_after=30)
    delivered = {i for ids in sink.landed.values() for i in ids}
    assert delivered == set(range(1000)) - poison  # every good row, each token once
    assert sum(len(ids) for ids in sink.landed.values()) == 997
    letters = spool.next_batch("picky", 10**6)
    assert letters is None  # the dead-letter pages went to the sink too (they hold no events)
    assert drainer.refused_rows == 3
    assert spool.dead_counts() == {("src", "log/1"): 3}
    spool.close()


def _prespool(data: Path, rows: list[list[Any]]) -> None:
    spool = Spool(data / "state.db")
    spool.register_sinks(["clickhouse"])
    for i in range(0, len(rows), 100):
        spool.commit_page("old", "log/x", {"src": "old", "vendor": "iotopen", "stream": "log/x", "e": rows[i:i + 100]},
                          None)
    spool.close()


def test_a_poison_clickhouse_batch_is_dead_lettered_and_the_rest_delivered(tmp_path: Path) -> None:
    """Rows spooled by an older syncd (before the guard): ClickHouse refuses two, takes the other 1,000
    spread over 150 months (more partitions than one insert may touch), and the pollers never wait."""
    sim = IotOpenSim(seed=33, installations=1, topics_per_installation=2, log_points=400)
    month = 31 * 86400 * 1000
    good = [[10_000 + i, "old", "iotopen", "log", "pre", "d", "m", 1_000_000_000_000 + (i % 150) * month + i, float(i), None, {}]
            for i in range(1000)]
    poison = [[-1, "old", "iotopen", "log", "pre", "d", "neg-id", 1_600_000_000_000, 1.0, None, {}],
              [20_000, "old", "iotopen", "log", "pre", "d", "text-value", 1_600_000_000_000, "abc", None, {}]]
    rows = good[:500] + poison[:1] + good[500:] + poison[1:]
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        _prespool(tmp_path / "data", rows)
        r = syncd("run", "--config", str(cfg), "--once")
        assert r.returncode == 0, r.stderr[-3000:]
    assert "spool.full_pausing_pollers" not in r.stderr
    (pre, months, letters, truth) = ch(
        tmp_path / "data", "SELECT count(), uniqExact(event_id) FROM syncd.events FINAL WHERE tenant = 'pre'",
        "SELECT uniqExact(toYYYYMM(ts)) FROM syncd.events WHERE tenant = 'pre'",
        "SELECT sink, stream, reason, payload FROM syncd.dead_letter FINAL ORDER BY payload",
        "SELECT count() FROM syncd.events FINAL WHERE tenant != 'pre'")
    assert pre == [[1000, 1000]] and months == [[150]]
    assert len(letters) == 2 and all(x[0] == "clickhouse" and x[1] == "log/x" for x in letters)
    assert all(x[2].startswith("clickhouse refused the row: events:") for x in letters)
    assert sorted('"metric":"neg-id"' in x[3] or '"metric":"text-value"' in x[3] for x in letters) == [True, True]
    assert truth == [[len(sim.ground_truth())]]
    assert r.stderr.count('"sink.row_refused"') == 2


def test_a_schema_mismatch_stops_only_that_sink_naming_the_column_then_resumes_when_fixed(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=34, installations=1, topics_per_installation=2, log_points=300)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        assert syncd("schema", "--config", str(cfg), "--apply").returncode == 0
        altered = syncd("query", "--config", str(cfg), "ALTER TABLE syncd.events RENAME COLUMN text TO message")
        assert altered.returncode == 0, altered.stderr
        r = syncd("run", "--config", str(cfg), "--once")
        assert r.returncode == 1
        assert r.stderr.count('"sink.stopped_schema_mismatch"') == 1
        assert logged(r.stderr, "sink.stopped_schema_mismatch", table="events", column="text")
        assert "syncd.events has no column text" in r.stderr
        status = syncd_status(cfg)
        waiting = len(sim.ground_truth())
        sink = status_row(status.stdout, "sinks", sink="clickhouse")
        assert (sink["backlog rows"], sink["state"]) == (str(waiting), "stopped"), status.stdout
        assert sink["detail"].startswith("schema mismatch"), status.stdout
        fixed = syncd("query", "--config", str(cfg), "ALTER TABLE syncd.events RENAME COLUMN message TO text")
        assert fixed.returncode == 0, fixed.stderr
        again = syncd("run", "--config", str(cfg), "--once")
        assert again.returncode == 0, again.stderr[-3000:]
    assert stored_keys(tmp_path / "data", "iotopen").keys() == truth_keys(sim).keys()


def test_poison_rows_never_wedge_the_mqtt_sink(tmp_path: Path, mosquitto: Any) -> None:
    """Rows an older syncd spooled before the guard: control characters and a 1 MB name publish under
    encoded, bounded topics; a year-33658 timestamp is refused by both sinks (a dead letter each), and
    every other row goes out; a second run has nothing left to retry."""
    sim = IotOpenSim(seed=35, installations=1, topics_per_installation=2, log_points=200)
    now = 1_900_000_000_000
    good = [[30_000 + i, "old", "iotopen", "log", "pre", "dev", f"m{i % 7}", now + i, float(i), None, {}]
            for i in range(500)]
    hostile = [[40_001, "old", "iotopen", "log", "pre", "dev\x01\x07\x1b[31mice", "m", now, 1.0, None, {}],
               [40_002, "old", "iotopen", "log", "pre", "dev", "x" * 1_000_000, now, 2.0, None, {}]]
    year_33658 = [40_003, "old", "iotopen", "log", "pre", "dev", "far", 1_000_000_000_000_000, 3.0, None, {}]
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim], f'\n[mqtt]\nurl = "{mosquitto.url}"\nmax_age = "36500d"\n')
        data = tmp_path / "data"
        spool = Spool(data / "state.db")
        spool.register_sinks(["clickhouse", "mqtt"])
        rows = good[:250] + hostile + [year_33658] + good[250:]
        spool.commit_page("old", "log/x", {"src": "old", "vendor": "iotopen", "stream": "log/x", "e": rows}, None)
        spool.close()
        sub = Subscriber(mosquitto.port, "syncd/iotopen/pre/#")
        try:
            r = syncd("run", "--config", str(cfg), "--once")
            assert r.returncode == 0, r.stderr[-3000:]
            sub.wait_quiet(quiet=1.0)
            seen = sub.event_ids()
            topics = {t for t, _ in sub.events()}
        finally:
            sub.close()
        second = syncd("run", "--config", str(cfg), "--once")
        assert second.returncode == 0, second.stderr[-3000:]
    assert seen == {r[0] for r in good + hostile}  # every row but the unrepresentable one, exactly
    assert max(len(t.encode()) for t in topics) < 1000 and all("\x01" not in t and "\x1b" not in t for t in topics)
    (letters, stored) = ch(data, "SELECT sink, reason FROM syncd.dead_letter FINAL WHERE stream = 'log/x' ORDER BY sink",
                           "SELECT count() FROM syncd.events FINAL WHERE tenant = 'pre'")
    assert [x[0] for x in letters] == ["clickhouse", "mqtt"]
    assert "ts" in letters[0][1] and "ts" in letters[1][1]
    assert stored == [[502]]
    status = syncd_status(cfg)
    assert [status_row(status.stdout, "sinks", sink=name)["backlog rows"] for name in ("mqtt", "clickhouse")] == ["0", "0"]


def test_secrets_stay_out_of_every_output_and_risky_settings_warn(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=36, installations=1, topics_per_installation=2, log_points=50)
    port, dead_port = free_port(), free_port()
    mqtt_password = "mqtt-pass-7f3a9c"
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim], f'\n[mqtt]\nurl = "mqtt://syncd:{mqtt_password}@127.0.0.1:{dead_port}"\n')
        cfg.write_text(cfg.read_text().replace('http = ""', f'http = "127.0.0.1:{port}"')
                       .replace('interval = "5s"', 'interval = "5s"\ntls_verify = false'))
        cfg.chmod(0o644)
        assert syncd("schema", "--config", str(cfg), "--apply").returncode == 0
        check = syncd("check", "--config", str(cfg))
        assert check.returncode == 0, check.stdout + check.stderr
        assert "is readable by every user on this machine" in check.stdout
        assert "sources[0] (iotopen-sim): tls_verify = false" in check.stdout
        sim.faults.expired = True
        daemon = popen_syncd("run", "--config", str(cfg))
        try:
            wait_for(lambda: _readyz(port)[0] == 503, timeout=60)
            ready = _readyz(port)[1]
            metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            status = syncd_status(cfg)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=120)
        once = syncd("run", "--config", str(cfg), "--once")
        assert once.returncode == 1
    assert '"config.warning"' in err and "tls_verify = false" in err
    (errors, letters) = ch(tmp_path / "data", "SELECT error FROM syncd.sync_status", "SELECT reason, payload FROM syncd.dead_letter")
    outputs = [check.stdout, check.stderr, err, ready, metrics_text, status.stdout, status.stderr, once.stdout, once.stderr,
               repr(errors), repr(letters)]
    for secret in (sim.api_key, mqtt_password):
        assert not [o for o in outputs if secret in o], secret


def test_a_reread_page_adds_no_dead_letter_twice_and_status_counts_them(tmp_path: Path) -> None:
    from syncd.sim.proxus import ProxusSim

    sim = ProxusSim(seed=37, rows=2000, alerts=5, malformed_rows=10)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\nrate = 50\npage_size = 400'))
        first = syncd("run", "--config", str(cfg), "--once")
        assert first.returncode == 0, first.stderr[-3000:]
        (before,) = ch(tmp_path / "data", "SELECT count() FROM syncd.dead_letter")
        with sqlite3.connect(tmp_path / "data" / "state.db") as db:  # state lost: every page is read again
            db.execute("DELETE FROM cursors")
        again = syncd("run", "--config", str(cfg), "--once")
        assert again.returncode == 0, again.stderr[-3000:]
        status = syncd_status(cfg)
    (after, distinct) = ch(tmp_path / "data", "SELECT count() FROM syncd.dead_letter",
                           "SELECT count() FROM syncd.dead_letter FINAL")
    n = before[0][0]
    assert n >= 8 and after == [[n]] and distinct == [[n]]
    assert status_row(status.stdout, "streams", source="proxus-sim", stream="telemetry")["dead letters"] == str(n)
    assert '"sync.dead_letters"' not in again.stderr  # nothing new to report


def test_a_slow_source_at_start_up_holds_back_no_other(tmp_path: Path) -> None:
    """The slow vendor answers its first 12 requests with 429 + Retry-After: 5 (a minute of discovery);
    the fast one is fully synced meanwhile, in the daemon and in --once alike."""
    fast, slow = IotOpenSim(seed=38, installations=2, log_points=800), IotOpenSim(seed=39, installations=1, log_points=50)
    port = free_port()
    with sims_in_thread([fast, slow]):
        cfg = write_config(tmp_path, [fast, slow])
        text = cfg.read_text().replace('http = ""', f'http = "127.0.0.1:{port}"')
        first = text.index('name = "iotopen-sim"')
        cfg.write_text(text[:first] + 'name = "fast"' + text[first + len('name = "iotopen-sim"'):]
                       .replace('name = "iotopen-sim"', 'name = "slow"'))
        slow.faults.update({"storm_429": 12, "retry_after": 5})
        daemon = popen_syncd("run", "--config", str(cfg))
        try:
            want = len(fast.ground_truth())
            wait_for(lambda: sum(v for k, v in metrics(port).items()
                                 if k.startswith("syncd_events_total{") and 'source="fast"' in k) == want, timeout=40)
            assert not [k for k in metrics(port) if k.startswith("syncd_events_total{") and 'source="slow"' in k]
            assert slow.faults.storm_429 > 0  # the slow one is still being refused: it really held nothing back
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=120)
    assert daemon.returncode == 0
