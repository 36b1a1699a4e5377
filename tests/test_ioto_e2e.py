"""Ioto end to end: simulator → `syncd run --once` (subprocess) → embedded ClickHouse."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from syncd.sim.common import VendorSim, sims_in_thread
from syncd.sim.ioto import IotoSim
from tests.helpers import ch, syncd, truth_keys, write_config

# Logs and alerts have no time filter: `start` only drops older records, so reach back past the sim's history
# (an ISO date, because live-mode sims run on a fake clock far from the real one).
EVERYTHING = 'start = "2020-01-01"\n'
FAST = 'rate = 100\nburst = 100\n'  # for sims without a rate limit


def ioto_config(tmp: Path, sim: VendorSim, extra: str = "") -> Path:
    return write_config(tmp, [sim], EVERYTHING + extra)


def stored(tmp: Path, *sql: str) -> tuple[dict[tuple[str, str, str, str, int], tuple[Any, Any]], list[Any]]:
    """`tests.helpers.stored_keys` plus more queries in the same process (each process costs ~1 s of chdb start)."""
    rows, *rest = ch(tmp / "data", "SELECT kind, tenant, device, metric, toUnixTimestamp64Milli(ts), value, text "
                                   "FROM syncd.events FINAL WHERE vendor = 'ioto'", *sql)
    return {(r[0], r[1], r[2], r[3], int(r[4])): (r[5], r[6]) for r in rows}, rest


def run_once(cfg: Path) -> Any:
    r = syncd("run", "--config", str(cfg), "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_once_stores_ground_truth_then_adds_nothing(tmp_path: Path) -> None:
    sim = IotoSim(seed=11)  # with the sim's own rate limit (20/s)
    with sims_in_thread([sim]):
        cfg = ioto_config(tmp_path, sim, "rate = 16\nburst = 4\n")  # just under it
        run_once(cfg)
        (before,) = ch(tmp_path / "data", "SELECT count() FROM syncd.events")
        run_once(cfg)
    truth = truth_keys(sim)
    keys, (after, uniq, status, blank) = stored(
        tmp_path, "SELECT count() FROM syncd.events", "SELECT uniqExact(event_id) FROM syncd.events",
        "SELECT count() FROM syncd.sync_status FINAL WHERE ok = 1",
        "SELECT count() FROM syncd.events WHERE tenant = '' OR (device = '' AND kind != 'alert')")
    kinds = {k[0] for k in truth}
    assert kinds == {"status", "log", "metric", "alert"}
    assert len(truth) == 600 + 6 * 5 + 6 * 3 * 5 + 24
    assert keys.keys() == truth.keys()
    for key in random.Random(1).sample(sorted(truth), 200):
        assert keys[key] == truth[key], key
    assert before == after == uniq == [[len(truth)]]
    assert status == [[6 * 3 + 1]]  # status, log and metric per device, one alert stream
    assert blank == [[0]]


class MalformedIotoSim(IotoSim):
    """The sim with three broken records: a log with neither ULID nor date, a non-numeric number, an undated alert."""

    def _log(self, j: int) -> dict[str, Any]:
        rec = super()._log(j)
        if j == 5:
            rec.update(id="not-a-ulid", updated="yesterday at noon")
        return rec

    def _store(self, d: int, k: int, w: int) -> dict[str, Any]:
        rec = super()._store(d, k, w)
        if (d, k) == (0, 3):  # "uptime", a number
            rec["value"] = "n/a"
        return rec

    def _alert(self, k: int, w: int) -> tuple[dict[str, Any], int]:
        rec, ts = super()._alert(k, w)
        if k == 2:
            rec = {**rec, "timestamp": "sometime"}
        return rec, ts


def test_malformed_records_are_dead_lettered_and_the_run_succeeds(tmp_path: Path) -> None:
    sim = MalformedIotoSim(seed=12, rate_limit=None)
    with sims_in_thread([sim]):
        run_once(ioto_config(tmp_path, sim, FAST))
    d, ts, _, _ = sim._log_parts(5)
    bad_log = ("log", sim.account_ids[sim._acct(d)], sim.device_ids[d], "log", ts)
    key, _, _, t = sim._store_parts(0, 3, sim.end_ms)
    bad_store = ("status", sim.account_ids[0], sim.device_ids[0], key, t)
    alert, ts = IotoSim._alert(sim, 2, sim.end_ms)
    bad_alert = ("alert", alert["accountId"], alert["context"].get("deviceId", ""), alert["name"], ts)
    expected = truth_keys(sim).keys() - {bad_log, bad_store, bad_alert}
    keys, (dead,) = stored(tmp_path, "SELECT stream, reason, payload FROM syncd.dead_letter ORDER BY stream")
    assert keys.keys() == expected
    assert len(dead) == 3
    by_stream = {row[0].split("/")[0]: row for row in dead}
    assert by_stream["alert"][1].startswith("timestamp:") and '"sometime"' in by_stream["alert"][2]
    assert by_stream["log"][1].startswith("updated:") and "not-a-ulid" in by_stream["log"][2]
    assert by_stream["status"][1].startswith("value:") and '"n/a"' in by_stream["status"][2]
