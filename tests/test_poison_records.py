"""Poison records end to end: one bad value costs its own record (a dead letter naming the field), never the stream.

Each vendor's simulator serves chosen records with bad values written raw (`poison=...`: timestamps of year 9999 or
33658, `1e300`, `"NaN"`, `true`, negative; `NaN`/`Infinity` literals; lone surrogate escapes; an `Infinity` id).
`syncd run --once` (a subprocess, the embedded ClickHouse) must store every good record exactly as the ground truth
says, turn every bad one into one `dead_letter` row whose reason names the field, lose nothing (good + dead ==
served), exit 0, and add nothing on a second run.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd.sim.common import Poisoned, VendorSim, sims_in_thread
from syncd.sim.ioto import POISONS as IOTO_POISONS
from syncd.sim.ioto import IotoSim
from syncd.sim.iotopen import POISONS as IOTOPEN_POISONS
from syncd.sim.iotopen import IotOpenSim
from syncd.sim.ixon import POISONS as IXON_POISONS
from syncd.sim.ixon import IxonSim
from syncd.sim.navixy import POISONS as NAVIXY_POISONS
from syncd.sim.navixy import NavixySim
from syncd.sim.proxus import POISONS as PROXUS_POISONS
from syncd.sim.proxus import ProxusSim
from tests.conftest import Mosquitto
from tests.helpers import ch, once_twice, stored_keys, syncd, truth_keys, write_config

Key = tuple[str, str, str, str, int]


def dead_letters(data: Path, vendor: str) -> list[tuple[str, str, str]]:
    (rows,) = ch(data, f"SELECT stream, reason, payload FROM syncd.dead_letter WHERE vendor = '{vendor}' ORDER BY stream")
    return [(r[0], r[1], r[2]) for r in rows]


def counts(data: Path, vendor: str) -> tuple[int, int]:
    """Raw rows (no FINAL) in events and dead_letter: a second run that re-sent anything would raise them."""
    (events, dead) = ch(data, f"SELECT count() FROM syncd.events WHERE vendor = '{vendor}'",
                        f"SELECT count() FROM syncd.dead_letter WHERE vendor = '{vendor}'")
    return events[0][0], dead[0][0]


def raw_values(data: Path, vendor: str) -> dict[Key, tuple[Any, str]]:
    """Events stored with a raw_value attr (a NaN/Infinity reading): key -> (value, raw text)."""
    (rows,) = ch(data, "SELECT kind, tenant, device, metric, toUnixTimestamp64Milli(ts), value, attrs['raw_value'] "
                       f"FROM syncd.events FINAL WHERE vendor = '{vendor}' AND attrs['raw_value'] != ''")
    return {(r[0], r[1], r[2], r[3], int(r[4])): (r[5], r[6]) for r in rows}


def assert_poison_handled(sim: VendorSim, data: Path, vendor: str, poisoned: list[Poisoned]) -> list[tuple[str, str, str]]:
    """Stored == truth exactly; one dead letter per served copy of each dead poison, naming its field; NaN readings
    stored as NULL with their raw text. Returns the dead letters."""
    truth = truth_keys(sim)
    stored = stored_keys(data, vendor)
    assert stored.keys() == truth.keys(), (sorted(truth.keys() - stored.keys())[:5], sorted(stored.keys() - truth.keys())[:5])
    for key, (value, text) in truth.items():
        got = stored[key]
        assert (got[0] == value or (got[0] is None and value is None)) and got[1] == text, (key, got, (value, text))
    dead = dead_letters(data, vendor)
    want = Counter(p.field for p in poisoned if p.field is not None)
    assert Counter(reason.split(":")[0] for _, reason, _ in dead) == want, dead
    nulls = {p.key: p for p in poisoned if p.field is None}
    raws = raw_values(data, vendor)
    assert raws.keys() == nulls.keys(), (raws, nulls)
    assert all(value is None for value, _ in raws.values())
    return dead


# -- IoT Open: every bad value, in the log and in the status list ---------------------------------------------------

def test_the_poison_really_goes_over_the_wire_raw() -> None:
    """A NaN literal and a lone surrogate escape in the body: orjson refuses the page, the standard library reads it."""
    sim = IotOpenSim(seed=30, installations=1, topics_per_installation=8, log_points=400,
                     poison="ts_nan_literal,value_infinity,surrogate_msg")
    with sims_in_thread([sim]):
        request = urllib.request.Request(f"{sim.url}/api/v3beta/log/10?from=0&order=asc&limit=10000",
                                         headers={"X-API-Key": sim.api_key})
        body = urllib.request.urlopen(request, timeout=10).read()
    assert b'"timestamp":NaN' in body and b'"value":-Infinity' in body and b'"msg":"smoke \\ud83d"' in body
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    data = json.loads(body)["data"]
    # each variant: a mid-history point and a topic's latest point
    assert len(data) == 400 and sum(isinstance(r["timestamp"], float) and math.isnan(r["timestamp"]) for r in data) == 2
    assert sum(r.get("msg") == "smoke \ud83d" for r in data) == 2
    assert len(sim.poisoned) == 9 and {p.raw for p in sim.poisoned} == {"NaN", "-Infinity", '"smoke \\ud83d"'}



def test_iotopen_every_poison_costs_only_its_record(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=31, installations=3, topics_per_installation=8, log_points=3000, poison=list(IOTOPEN_POISONS))
    assert {p.variant for p in sim.poisoned} == set(IOTOPEN_POISONS)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        first, _, between = once_twice(cfg)
    data = tmp_path / "data"
    dead = assert_poison_handled(sim, data, "iotopen", sim.poisoned)
    # 13 variants x (one mid-history point + the latest point of another topic, also in its status list)
    assert Counter(p.key[0] for p in sim.poisoned) == {"log": 26, "status": 13}
    assert len(dead) == sum(1 for p in sim.poisoned if p.field) == 30
    assert Counter(r.split(":")[0] for _, r, _ in dead) == {"timestamp": 21, "client_id": 3, "text": 3, "metric": 3}
    # nothing vanished: every served record is a stored event or a dead letter, per stream kind
    stored = stored_keys(data, "iotopen")
    dead_by_kind = Counter(stream.split("/")[0] for stream, _, _ in dead)
    assert sum(k[0] == "log" for k in stored) + dead_by_kind["log"] == 3000
    assert sum(k[0] == "status" for k in stored) + dead_by_kind["status"] == 24
    # the reasons say what was wrong, the payloads keep the bad value as it came
    reasons = [r for _, r, _ in dead]
    assert any("9999-12-31T23:59:59Z" in r and "1900-01-01..2299-12-31" in r for r in reasons)
    assert any("33658-09-27" in r for r in reasons) and any("1e+300" in r for r in reasons)
    assert any("negative" in r for r in reasons) and any("True" in r for r in reasons)
    assert all("\\ud83d" in p for _, r, p in dead if r.startswith(("text", "metric")))
    assert any('"timestamp":NaN' in p for _, _, p in dead) and any('"timestamp":"NaN"' in p for _, _, p in dead)
    raws = raw_values(data, "iotopen")
    assert Counter(raw for _, raw in raws.values()) == {"NaN": 6, "-Infinity": 3}  # 3 variants x (log, latest, status)
    # the second run found nothing new: no event, no dead letter sent again
    assert counts(data, "iotopen") == (between[0][0], len(dead))
    assert '"sync.dead_letters"' in first.stderr


def test_iotopen_a_log_page_whose_data_is_an_object_fails_the_stream_and_keeps_its_cursor(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=32, installations=2, topics_per_installation=4, log_points=800, envelope="data_object")
    data = tmp_path / "data"
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        broken = syncd("run", "--config", str(cfg), "--once")
        assert broken.returncode == 1, broken.stderr[-3000:]
        failed = [json.loads(line) for line in broken.stderr.splitlines() if '"run.stream_failed"' in line]
        assert sorted(f["stream"] for f in failed) == ["log/10", "log/20"], broken.stderr[-3000:]
        assert all("MalformedResponse" in f["reason"] and "data array" in f["reason"] for f in failed)
        assert log_cursors(data) == {}  # the cursor never moved: nothing of the log was taken as read
        sim.envelope = ""
        healed = syncd("run", "--config", str(cfg), "--once")
        assert healed.returncode == 0, healed.stderr[-3000:]
        assert stored_keys(data, "iotopen").keys() == truth_keys(sim).keys()  # the whole log, nothing skipped
        good = log_cursors(data)
        sim.envelope = "total_string"  # the other malformed envelope: a total that is not a number
        again = syncd("run", "--config", str(cfg), "--once")
        assert again.returncode == 1 and '"run.stream_failed"' in again.stderr
        assert log_cursors(data) == good and len(good) == 2


def log_cursors(data: Path) -> dict[str, Any]:
    with sqlite3.connect(data / "state.db") as db:
        rows = db.execute("SELECT stream, cursor FROM cursors WHERE stream LIKE 'log/%'").fetchall()
    return {stream: json.loads(cursor) for stream, cursor in rows}


# -- the other four vendors: each kind of poison that applies ------------------------------------------------------

def test_proxus_poison_rows_and_alerts(tmp_path: Path) -> None:
    sim = ProxusSim(seed=33, rows=3000, alerts=12, poison=list(PROXUS_POISONS))
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('name = "proxus-sim"', 'name = "proxus-sim"\nstart = "48h"'))
        _, _, between = once_twice(cfg)
    data = tmp_path / "data"
    dead = assert_poison_handled(sim, data, "proxus", sim.poisoned)
    assert Counter(r.split(":")[0] for _, r, _ in dead) == {"Time": 1, "DeviceId": 1, "metric": 1, "text": 2,
                                                          "CreatedOn": 1}
    assert Counter(s for s, _, _ in dead) == {"telemetry": 4, "alert": 2}
    assert counts(data, "proxus") == (between[0][0], 6)


def test_ioto_poison_items(tmp_path: Path) -> None:
    sim = IotoSim(seed=34, rate_limit=None, poison=list(IOTO_POISONS))
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\nstart = "72h"\npage_size = 40'))
        _, _, between = once_twice(cfg)
    data = tmp_path / "data"
    dead = assert_poison_handled(sim, data, "ioto", sim.poisoned)
    assert Counter(r.split(":")[0] for _, r, _ in dead) == {"updated": 2, "deviceId": 1, "id": 1, "text": 1,
                                                          "timestamp": 1}
    assert counts(data, "ioto") == (between[0][0], 6)


def test_ixon_poison_points(tmp_path: Path) -> None:
    sim = IxonSim(seed=35, agents=2, tags_per_agent=8, points_per_tag=120, alarms=3, poison=list(IXON_POISONS))
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\nstart = "48h"'))
        _, _, between = once_twice(cfg)
    data = tmp_path / "data"
    dead = assert_poison_handled(sim, data, "ixon", sim.poisoned)
    assert Counter(r.split(":")[0] for _, r, _ in dead) == {"time": 1, "text": 1}
    assert counts(data, "ixon") == (between[0][0], 2)


def test_navixy_poison_messages(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim = NavixySim(seed=36, trackers=5, mqtt_url=mosquitto.url, poison=list(NAVIXY_POISONS))
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        first = syncd("run", "--config", str(cfg), "--once")  # makes the broker session, so nothing is missed
        assert first.returncode == 0, first.stderr[-3000:]
        asyncio.run(sim.publish(60))  # while syncd is down: the broker queues them for the session
        assert {p.variant for p in sim.poisoned} == set(NAVIXY_POISONS)
        _, _, between = once_twice(cfg)
    data = tmp_path / "data"
    dead = assert_poison_handled(sim, data, "navixy", sim.poisoned)
    assert Counter(r.split(":")[0] for _, r, _ in dead) == {"message_time": 1, "device_id": 1, "text": 1}
    assert counts(data, "navixy") == (between[0][0], 3)

