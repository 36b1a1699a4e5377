"""A world worse than the connectors assume, end to end: simulators in their worse modes → `syncd run --once`
(subprocesses) → embedded ClickHouse, compared exactly with the simulators' ground truth.

- a device with a wrong clock stamps a value next year (and one 200 years ahead): it is stored, and every value
  after it still arrives (IoT Open: a cursor never passes the window it was read in);
- values that show up hours after their timestamp (IoT Open), or out of order up to 5 minutes late (IXON), are
  stored by the re-read of the trailing `late_window`;
- Ioto serves a device's logs newest first, or in no order at all;
- a mapping that changes (an IoT Open FunctionX added after the first sync, a Navixy tracker missing from
  tracker/list at first) never gives one series a second device key, whatever is read or delivered again.

The simulators' clocks are real time, moved ahead where a test needs values to show up later (the connector's
clock stays real: it only ever sees the vendor show more).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import TypeAdapter

from syncd.http import TokenBucket, VendorClient
from syncd.settings import SourceSettings
from syncd.sim.common import VendorSim, sims_in_thread, start_sims
from syncd.sim.ioto import LAG, IotoSim
from syncd.sim.iotopen import YEAR, IotOpenSim
from syncd.sim.ixon import IxonSim
from syncd.sim.navixy import NavixySim
from syncd.sources.base import Source
from syncd.sources.ioto import IotoSource
from syncd.sources.iotopen import IotOpenSource
from syncd.sources.ixon import IxonSource
from tests.conftest import Mosquitto
from tests.helpers import Run, ch, stored_keys, syncd, truth_keys, write_config

Key = tuple[str, str, str, str, int]


class SimClock:
    """Real time plus `shift` seconds, or `frozen` once set: what a simulator shows moves only when a test says."""

    def __init__(self) -> None:
        self.shift = 0.0
        self.frozen: float | None = None

    def __call__(self) -> float:
        return self.frozen if self.frozen is not None else time.time() + self.shift


def config(tmp: Path, sim: VendorSim, *lines: str) -> Path:
    """The simulator's config with `lines` added to its source."""
    cfg = write_config(tmp, [sim])
    cfg.write_text(cfg.read_text().replace('interval = "5s"', "\n".join(('interval = "5s"', *lines))))
    return cfg


def once(cfg: Path) -> Run:
    r = syncd("run", "--config", str(cfg), "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_exact(data: Path, sim: VendorSim, vendor: str, kinds: tuple[str, ...] = ()) -> dict[Key, tuple[Any, Any]]:
    """Stored (FINAL) == ground truth, keys and values, and not one row more (no second device key for a series).

    `kinds` narrows both sides (a live simulator's status truth holds only each topic's newest value)."""
    truth = {k: v for k, v in truth_keys(sim).items() if not kinds or k[0] in kinds}
    stored = {k: v for k, v in stored_keys(data, vendor).items() if not kinds or k[0] in kinds}
    missing, extra = sorted(truth.keys() - stored.keys()), sorted(stored.keys() - truth.keys())
    assert not missing and not extra, (len(missing), missing[:5], len(extra), extra[:5])
    assert stored == truth
    where = f"vendor = '{vendor}'" + (f" AND kind IN {tuple(kinds)!r}".replace(",)", ")") if kinds else "")
    ((count, ids),) = ch(data, f"SELECT count(), uniqExact(event_id) FROM syncd.events FINAL WHERE {where}")[0]
    assert count == ids == len(truth)
    return truth


def drop_state(data: Path) -> None:
    """state.db lost (a restore, a new volume): the streams start again from the store, minus an overlap."""
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (data / name).unlink(missing_ok=True)


def series_with_two_keys(data: Path, vendor: str, series: str = "tenant, metric") -> list[list[Any]]:
    """Series (`series`: the columns that name one whatever its device key) stored under more than one device key."""
    (rows,) = ch(data, f"SELECT {series}, groupUniqArray(device) AS d FROM syncd.events FINAL "
                       f"WHERE vendor = '{vendor}' GROUP BY {series} HAVING length(d) > 1")
    return rows


# -- IoT Open ---------------------------------------------------------------------------------------------------

def test_iotopen_a_value_stamped_next_year_is_stored_and_every_later_value_still_arrives(tmp_path: Path) -> None:
    """A live installation; one value stamped a year ahead, one 200 years ahead, among the normal ones. Small pages,
    so values come on pages after the future ones; then the cloud logs on and a second run reads what came since."""
    clock = SimClock()
    sim = IotOpenSim(seed=61, clock=clock, live=True, installations=2, topics_per_installation=4, log_points=320,
                     history=900.0, future_stamped=(YEAR, 200 * YEAR))
    future = {("log", *sim._keys(e.topic), e.ts_ms): e for e in sim.extras}
    with sims_in_thread([sim]):
        cfg = config(tmp_path, sim, "page_size = 40")
        once(cfg)
        first = truth_keys(sim)
        # the cloud logs on (a point every ~21 s per topic); then its world stops, and the next run starts when
        # its window (now - 10 s) covers everything the sim shows (now - 5 s)
        time.sleep(25)
        clock.frozen = time.time()
        time.sleep(7)
        once(cfg)
        truth = assert_exact(tmp_path / "data", sim, "iotopen", ("log",))
        status = {k for k in truth_keys(sim) if k[0] == "status"}
    assert status <= stored_keys(tmp_path / "data", "iotopen").keys()  # each topic's newest value, too
    assert future.keys() <= truth.keys() and len(future) == 2
    years = sorted(time.gmtime(k[4] / 1000).tm_year - time.gmtime(e.filed_ms / 1000).tm_year for k, e in future.items())
    assert years == [1, 200]
    for key, e in future.items():  # values of the same installation filed after the future one, by both runs
        later = [k for k in truth if k[0] == "log" and k[1] == key[1] and e.filed_ms < k[4] < e.ts_ms]
        assert len([k for k in later if k in first]) > 20 and len([k for k in later if k not in first]) > 0, key
    assert len(truth) > sum(k[0] == "log" for k in first)


def test_iotopen_values_two_hours_late_are_stored_by_a_later_run(tmp_path: Path) -> None:
    """Six values show up in the log two hours after their timestamp, long after the forward read passed them."""
    clock = SimClock()
    sim = IotOpenSim(seed=62, clock=clock, installations=2, topics_per_installation=4, log_points=2000,
                     late_by=7200.0, late_points=6)
    late = {("log", *sim._keys(e.topic), e.ts_ms) for e in sim.extras}
    with sims_in_thread([sim]):
        cfg = config(tmp_path, sim, 'late_window = "3h"', 'reconcile_every = "0s"')
        once(cfg)
        first = assert_exact(tmp_path / "data", sim, "iotopen")
        assert not late & first.keys() and len(late) == 6  # not there yet
        clock.shift = 7200 + 60  # two hours on: they have appeared
        once(cfg)
        truth = assert_exact(tmp_path / "data", sim, "iotopen")
    assert late <= truth.keys() and len(truth) == len(first) + 6


def test_iotopen_a_functionx_mapped_after_the_first_sync_keeps_the_device_key(tmp_path: Path) -> None:
    """The first run sees three topics of each installation without a FunctionX; then they are mapped, state.db is
    lost and the last hour is read again: every series keeps its one device key (no doubles after FINAL)."""
    sim = IotOpenSim(seed=63, installations=2, topics_per_installation=8, log_points=4000, hidden_functions=3)
    hidden = {str(f["id"]) for fns in sim.functions for f in fns[:3]}
    with sims_in_thread([sim]):
        cfg = config(tmp_path, sim)
        once(cfg)
        sim.add_functions()
        drop_state(tmp_path / "data")
        second = once(cfg)
    assert '"stream.resumed_from_sink"' in second.stderr  # the overlap hour was read again
    data = tmp_path / "data"
    assert series_with_two_keys(data, "iotopen") == []  # a topic is one series of its installation
    assert_exact(data, sim, "iotopen")
    # the mapping shows in attrs of what was read after it appeared
    (mapped,) = ch(data, "SELECT DISTINCT attrs['function_id'] FROM syncd.events FINAL "
                         "WHERE vendor = 'iotopen' AND attrs['function_id'] != ''")
    assert hidden <= {r[0] for r in mapped}



# -- Ioto -------------------------------------------------------------------------------------------------------

def behind(seconds: float) -> SimClock:
    """A simulator clock that stands `seconds` behind real time until a test moves it."""
    clock = SimClock()
    clock.frozen = time.time() - seconds
    return clock


def ioto_logs(tmp: Path, sim: IotoSim, *lines: str, runs: int = 2, step: float = 3 * 3600) -> dict[Key, Any]:
    """`runs` runs of the log streams, the cloud logging on `step` seconds between them; exact after each.

    The simulator's clock stands still during a run (a live cloud logging on meanwhile would race the check) and
    behind ours, so its logs are never dated ahead of the connector's clock unless a test plants one."""
    clock = sim.clock
    assert isinstance(clock, SimClock) and clock.frozen is not None
    with sims_in_thread([sim]):
        cfg = config(tmp, sim, 'start = "2020-01-01"', 'streams = ["log"]', "rate = 100", "burst = 100",
                     "page_size = 7", *lines)
        for run in range(runs):
            if run:
                clock.frozen += step
            once(cfg)
            clock.frozen += LAG  # the truth of a live Ioto sim lags its API
            truth = assert_exact(tmp / "data", sim, "ioto", ("log",))
            clock.frozen -= LAG
    assert clock.frozen < time.time()
    return truth


def test_ioto_logs_served_newest_first_are_stored_exactly(tmp_path: Path) -> None:
    sim = IotoSim(seed=64, clock=behind(10 * 3600), live=True, devices=3, logs=150, rate_limit=None,
                  log_order="newest")
    truth = ioto_logs(tmp_path, sim)
    assert len(truth) > 150  # the cloud logged on between the runs
    firsts = [r for r in sim.requests if r.path == "/tok/generic/find" and b'"Log"' in r.body and "next" not in dict(r.query)]
    assert len(firsts) == 2 * 3  # each run read every device's list from the top


def test_ioto_logs_served_in_no_order_are_stored_exactly(tmp_path: Path) -> None:
    sim = IotoSim(seed=65, clock=behind(10 * 3600), live=True, devices=3, logs=150, rate_limit=None,
                  log_order="shuffled")
    assert len(ioto_logs(tmp_path, sim, runs=3)) > 150


def test_ioto_a_log_dated_an_hour_ahead_hides_no_later_log(tmp_path: Path) -> None:
    """Oldest first as the connector likes it, but two devices' clocks run ahead: a log dated an hour ahead (of
    every clock here) and one dated a year ahead, both kept in the list where they were written. A log every 10 s."""
    sim = IotoSim(seed=66, clock=behind(600), live=True, devices=3, logs=720, history=7200, rate_limit=None,
                  future_logs=(3600.0, YEAR))
    truth = ioto_logs(tmp_path, sim, step=300)
    assert {e.ts_ms for e in sim.extra_logs} <= {k[4] for k in truth}
    hour = sim.extra_logs[0]
    assert hour.ts_ms > time.time() * 1000  # ahead of the connector's clock too
    assert sum(hour.written_ms < k[4] < hour.ts_ms for k in truth if k[2] == sim.device_ids[hour.d]) > 5


def test_ioto_logs_two_hours_late_are_stored_by_the_re_read(tmp_path: Path) -> None:
    sim = IotoSim(seed=67, clock=behind(10 * 3600), live=True, devices=3, logs=150, rate_limit=None, late_by=7200.0,
                  late_logs=4)
    truth = ioto_logs(tmp_path, sim, 'late_window = "3h"', 'reconcile_every = "0s"', step=7200 + 60)
    assert {e.ts_ms for e in sim.extra_logs} <= {k[4] for k in truth}


# -- IXON -------------------------------------------------------------------------------------------------------

def test_ixon_points_visible_one_to_five_minutes_late_out_of_order_are_stored_exactly(tmp_path: Path) -> None:
    """Each point shows up 1 to 5 minutes after its time, its own delay (an upload landing point by point), while
    the connector reads up to now minus 60 s: a point may appear after a later one of its tag was stored."""
    clock = SimClock()
    clock.frozen = time.time()
    sim = IxonSim(seed=68, clock=clock, agents=2, tags_per_agent=6, points_per_tag=720, history=3600,
                  rate_limit=None, lag=60, lag_max=300)
    with sims_in_thread([sim]):
        cfg = config(tmp_path, sim, 'streams = ["telemetry"]', 'reconcile_every = "0s"')  # late_window: 1 h
        once(cfg)
        first = assert_exact(tmp_path / "data", sim, "ixon", ("telemetry",))
        clock.frozen += 600  # ten minutes on: every point has shown up
        once(cfg)
        truth = assert_exact(tmp_path / "data", sim, "ixon", ("telemetry",))
    newest: dict[tuple[str, str], int] = {}
    for k in first:
        newest[k[2:4]] = max(newest.get(k[2:4], 0), k[4])
    behind = [k for k in truth.keys() - first.keys() if k[4] < newest[k[2:4]]]
    assert len(behind) > 12  # appeared after a later point of their tag had been stored: only a re-read finds them


def test_ixon_a_lag_of_five_minutes_is_stored_exactly(tmp_path: Path) -> None:
    """Every point shows up 5 minutes after its time, the connector assumes 60 s: it keeps asking from each tag's
    newest stored point, so the points it asked for too early come on the next run."""
    clock = SimClock()
    sim = IxonSim(seed=69, clock=clock, live=True, agents=2, tags_per_agent=6, points_per_tag=360, history=3600,
                  rate_limit=None, lag=300)
    with sims_in_thread([sim]):
        cfg = config(tmp_path, sim, 'streams = ["telemetry"]')
        once(cfg)
        first = [k for k in truth_keys(sim) if k[0] == "telemetry"]
        time.sleep(12)  # a point every 10 s per tag
        clock.frozen = time.time()
        once(cfg)
        truth = assert_exact(tmp_path / "data", sim, "ixon", ("telemetry",))
    assert len(truth) >= len(first) + 12


# -- Navixy -----------------------------------------------------------------------------------------------------

def test_navixy_a_tracker_listed_only_later_keeps_its_device_key(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Tracker 0 publishes before tracker/list lists it; once listed, QoS 1 delivers its messages again: one device
    key per series all along, so the redelivery doubles nothing (FINAL count == ground truth)."""
    sim = NavixySim(seed=70, trackers=5, mqtt_url=mosquitto.url, unlisted=(0,))
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        once(cfg)  # makes the broker session: it keeps what comes while syncd is down
        asyncio.run(sim.publish(40))
        once(cfg)  # tracker 0 is not listed yet
        sim.list_trackers()
        asyncio.run(sim.redeliver())
        asyncio.run(sim.publish(20))
        last = once(cfg)
    assert '"navixy.devices_not_refreshed"' not in last.stderr
    data = tmp_path / "data"
    assert series_with_two_keys(data, "navixy", "tenant, attrs['device_id'], metric") == []
    truth = assert_exact(data, sim, "navixy")
    zero = sim.imei(0)
    assert sum(k[2] == zero for k in truth) > 40
    (attrs,) = ch(data, f"SELECT DISTINCT attrs['source_id'] FROM syncd.events FINAL WHERE device = '{zero}'")
    assert attrs == [[str(sim.source_id(0))]]  # what the last delivery knew of it, once listed


# -- late rows are counted (in process: the connectors on the engine's client, one clock for both sides) -----------

class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def sync_late(source: Source, cursors: dict[str, Any]) -> tuple[set[Key], int]:
    """What one `--once` run of `source` does: every pull stream paged until done; its event keys and `Page.late`."""
    keys, late = set(), 0
    for stream in await source.discover():
        while True:
            page = await source.fetch(stream, cursors.get(stream.name))
            keys |= {(e.kind, e.tenant, e.device, e.metric, e.ts_ms) for e in page.events}
            late += page.late
            cursors[stream.name] = page.cursor
            if page.done:
                break
    return keys, late


async def late_counts(sim: VendorSim, cls: type[Source], clock: FakeClock, steps: list[float], **cfg: Any) -> list[int]:
    """`Page.late` summed per run; before each run after the first the clock moves on by the next step."""
    runners = await start_sims([sim])
    try:
        async with aiohttp.ClientSession() as session:
            config = TypeAdapter(SourceSettings).validate_python({"name": "late", **sim.source_config(), **cfg})
            client = VendorClient(session, TokenBucket(1000, 1000), timeout=10, map_error=cls.map_error)
            source, out = cls(config, client, clock=clock), []
            cursors: dict[str, Any] = {}
            for step in [0.0, *steps]:
                clock.now += step
                out.append((await sync_late(source, cursors))[1])
            return out
    finally:
        for r in runners:
            await r.cleanup()


async def test_late_rows_are_counted_once_per_row() -> None:
    late = {"late_window": "3h", "reconcile_every": "0s"}
    clock = FakeClock(time.time())
    sim = IotOpenSim(seed=71, clock=clock, installations=2, topics_per_installation=4, log_points=2000,
                     late_by=7200.0, late_points=6)
    assert await late_counts(sim, IotOpenSource, clock, [7260, 600], streams=["log"], **late) == [0, 6, 0]

    clock = FakeClock(time.time())
    ioto = IotoSim(seed=72, clock=clock, devices=3, logs=2000, rate_limit=None, late_by=7200.0, late_logs=4)
    assert await late_counts(ioto, IotoSource, clock, [7260, 600], streams=["log"], start="2020-01-01",
                             **late) == [0, 4, 0]

    clock = FakeClock(time.time())
    ixon = IxonSim(seed=73, clock=clock, agents=2, tags_per_agent=6, points_per_tag=720, history=3600,
                   rate_limit=None, lag=60, lag_max=300)
    first = {k for k in truth_keys(ixon) if k[0] == "telemetry"}
    newest: dict[tuple[str, str], int] = {}
    for k in first:
        newest[k[2:4]] = max(newest.get(k[2:4], 0), k[4])
    counts = await late_counts(ixon, IxonSource, clock, [600, 600, 600], streams=["telemetry"],
                               reconcile_every="0s")
    behind = [k for k in truth_keys(ixon) if k[0] == "telemetry" and k not in first and k[4] < newest[k[2:4]]]
    assert counts[0] == 0 and sum(counts) == len(behind) > 12 and counts[-1] == 0
