"""Proxus end to end: simulator → `syncd run --once` (subprocess) → embedded ClickHouse."""

from __future__ import annotations

import random
from pathlib import Path

from syncd.sim.common import sims_in_thread
from syncd.sim.proxus import ProxusSim
from tests.helpers import ch, once_twice, stored_keys, syncd, truth_keys, write_config
from tests.test_proxus_quirks import raw_lines

HOSTILE_DEVICE = "pump'; DROP TABLE x; --"


def _config(tmp_path: Path, sim: ProxusSim, extra: str = "") -> Path:
    cfg = write_config(tmp_path, [sim])
    cfg.write_text(cfg.read_text().replace('interval = "5s"', f'interval = "5s"\nrate = 50\n{extra}'))
    return cfg


def test_once_stores_ground_truth_then_adds_nothing(tmp_path: Path) -> None:
    sim = ProxusSim(seed=21, rows=6000, alerts=25)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, "page_size = 700")
        first, second, before = once_twice(cfg)
    truth = truth_keys(sim)
    stored = stored_keys(tmp_path / "data", "proxus")
    assert len(stored) == len(truth) == 6000 + 25
    assert stored.keys() == truth.keys()
    for key in random.Random(1).sample(sorted(truth), 400):  # a sample of values, text included
        assert stored[key] == truth[key], key
    after, uniq, status, names = ch(
        tmp_path / "data", "SELECT count() FROM syncd.events", "SELECT uniqExact(event_id) FROM syncd.events",
        "SELECT stream FROM syncd.sync_status FINAL WHERE ok = 1 AND vendor = 'proxus' ORDER BY stream",
        "SELECT DISTINCT kind, device, attrs['device_name'] FROM syncd.events WHERE device = '2' ORDER BY kind")
    assert before == after == uniq == [[6025]]  # the second run re-read nothing and added nothing
    assert status == [["alert"], ["telemetry"]]
    assert names == [["alert", "2", HOSTILE_DEVICE], ["telemetry", "2", HOSTILE_DEVICE]]  # alerts: from the inventory
    (alert_attrs,) = ch(tmp_path / "data", "SELECT attrs FROM syncd.events WHERE kind = 'alert' LIMIT 1")
    assert {"alert_id", "rule_id", "severity", "status", "device_name"} <= set(alert_attrs[0][0])
    assert sim.password not in first.stderr + second.stderr and "eyJ" not in first.stderr + second.stderr  # no JWT


def test_malformed_rows_go_to_dead_letter_naming_the_field(tmp_path: Path) -> None:
    sim = ProxusSim(seed=22, rows=3000, alerts=10, malformed_rows=12)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, "page_size = 400")
        r = syncd("run", "--config", str(cfg), "--once")
        broken = [line for line in raw_lines(sim) if "0000-00-00" in line or '"DeviceId":null' in line]
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"sync.dead_letters"' in r.stderr
    assert stored_keys(tmp_path / "data", "proxus").keys() == truth_keys(sim).keys()  # the rest all arrived
    (dead,) = ch(tmp_path / "data", "SELECT stream, reason, payload FROM syncd.dead_letter WHERE vendor = 'proxus'")
    assert len(dead) == len(broken) >= 8  # each broken line once: none lost, none read twice
    reasons = {reason.split(":")[0] for _, reason, _ in dead}
    assert reasons == {"Time", "DeviceId"}, dead  # both kinds of broken line, each named by its field
    assert all(stream == "telemetry" for stream, _, _ in dead)
    assert any("0000-00-00 00:00:00.000" in payload for _, _, payload in dead)
    assert any('"DeviceId":null' in payload for _, _, payload in dead)
