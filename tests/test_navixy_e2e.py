"""Navixy end to end: simulator → NGP over a real Mosquitto → `syncd run --once` (subprocess) → embedded ClickHouse.

One scenario (module fixture) is run once and the quirk tests below read what it left behind:
run 1 creates the broker session, then the simulator publishes (plus malformed messages) while syncd is
down, run 2 collects it all, run 3 adds nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from syncd.sim.common import sims_in_thread
from syncd.sim.navixy import TOPICS, NavixySim, _h
from tests.conftest import Mosquitto
from tests.helpers import ch, stored_keys, syncd, truth_keys, write_config

MESSAGES = 150
TRACKERS = 7  # 4 trackers in the MQTT flow + the emulator publish; 7 trackers = mapping pages 0, 2, 4, 6 at limit 2

BAD_MESSAGES = [
    b"{not json",
    json.dumps({"device_id": "x-1", "location": {"latitude": 1.0}}).encode(),  # no message_time
    json.dumps({"device_id": "x-2", "message_time": "yesterday", "temperature_2": 4}).encode(),
    json.dumps({"message_time": "2025-01-01T00:00:00Z", "temperature_2": 4}).encode(),  # no device_id
    b"[1, 2, 3]",
]


# Read once after the scenario (every ch() call is a subprocess opening the embedded store).
QUERIES = {
    "stored": "SELECT kind, tenant, device, metric, toUnixTimestamp64Milli(ts), value, text FROM syncd.events FINAL",
    "counts": "SELECT count(), uniqExact(event_id) FROM syncd.events",
    "telemetry_rows": "SELECT count() FROM syncd.events WHERE kind = 'telemetry'",
    "tenants": "SELECT DISTINCT tenant FROM syncd.events",
    "metrics": "SELECT metric, count(), countIf(value IS NOT NULL), countIf(text IS NOT NULL), "
               "groupUniqArrayIf(toString(value), metric = 'is_moving') FROM syncd.events GROUP BY metric",
    "header_attrs": "SELECT attrs['version'], countIf(attrs['event_id'] != '') > 0 FROM syncd.events GROUP BY attrs['version']",
    "devices": "SELECT DISTINCT device, attrs['device_id'], attrs['source_id'], attrs['label'], attrs['model'], "
               "attrs['tracker_id'], attrs['flow_id'] FROM syncd.events",
    "dead": "SELECT reason, payload FROM syncd.dead_letter WHERE vendor = 'navixy' ORDER BY reason",
}


@dataclass
class Scenario:
    sim: NavixySim
    data: Path
    runs: list[subprocess.CompletedProcess[str]]
    counts: list[list[list[Any]]]  # count(), uniqExact(event_id) after runs 2 and 3
    q: dict[str, list[list[Any]]]

    def stored(self) -> dict[tuple[str, str, str, str, int], tuple[Any, Any]]:
        return {(r[0], r[1], r[2], r[3], int(r[4])): (r[5], r[6]) for r in self.q["stored"]}


async def publish_raw(url: str, payloads: list[bytes]) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port), identifier="test-raw-publisher") as client:
        for body in payloads:
            await client.publish(TOPICS[0], body, qos=1)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("navixy")
    (tmp / "mosquitto").mkdir()
    broker = Mosquitto(tmp / "mosquitto")
    broker.start()
    try:
        sim = NavixySim(seed=21, trackers=TRACKERS, mqtt_url=broker.url)
        with sims_in_thread([sim]):
            cfg = write_config(tmp, [sim])
            cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\npage_size = 2'))
            runs = [syncd("run", "--config", str(cfg), "--once")]  # creates the persistent session
            asyncio.run(sim.publish(MESSAGES))  # syncd is down: the broker queues them for the session
            asyncio.run(publish_raw(broker.url, BAD_MESSAGES))
            runs.append(syncd("run", "--config", str(cfg), "--once"))
            counts = [ch(tmp / "data", "SELECT count(), uniqExact(event_id) FROM syncd.events")[0]]
            runs.append(syncd("run", "--config", str(cfg), "--once"))
        results = ch(tmp / "data", *QUERIES.values())
        counts.append(results[1])
        yield Scenario(sim, tmp / "data", runs, counts, dict(zip(QUERIES, results, strict=True)))
    finally:
        broker.stop()


def finished(run: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run.stderr.splitlines() if '"sync.finished"' in line]


def test_once_stores_ground_truth_then_adds_nothing(scenario: Scenario) -> None:
    for r in scenario.runs:
        assert r.returncode == 0, r.stderr[-3000:]
    truth = truth_keys(scenario.sim)
    stored = scenario.stored()
    assert len(truth) > MESSAGES * 10  # every message has a dozen attributes
    assert stored.keys() == truth.keys()
    for key in random.Random(1).sample(sorted(truth), 400):  # a sample of values, text included
        assert stored[key] == truth[key], key
    assert scenario.counts[0] == scenario.counts[1] == [[len(truth), len(truth)]]  # run 3 added 0 rows
    assert scenario.q["tenants"] == [[str(scenario.sim.user_id)]]  # the account's user id (user/get_info)


def test_messages_published_while_syncd_was_down_arrive_on_the_next_run(scenario: Scenario) -> None:
    """Persistent session (clean_session=False, stable client id): the broker kept what came while syncd was down."""
    first, second, third = (finished(r) for r in scenario.runs)
    assert [f["events"] for f in first] == [0]  # nothing published yet: run 1 only created the session
    assert second[0]["events"] > 0 and second[0]["ok"] is True
    assert [f["events"] for f in third] == [0]
    assert '"mqtt_push.subscribed"' in scenario.runs[0].stderr and "syncd-syncd-0-navixy-sim" in scenario.runs[0].stderr


def test_qos1_duplicate_delivery_stores_one_row(scenario: Scenario) -> None:
    """Every message arrives once per topic, and QoS 1 repeats some: still one row per (device, metric, ts)."""
    sim = scenario.sim
    repeated = [(p, ts) for p, stamps in sim._published.items() for ts in stamps if _h(sim.seed, p, ts, "dup") % 20 == 0]
    assert repeated and len(TOPICS) == 2  # the broker delivered 2 or 3 copies of each message
    assert scenario.q["telemetry_rows"] == [[len(truth_keys(sim))]]  # without FINAL: no copy reached the table


def test_ngp_flattening_nested_location_bools_and_strings(scenario: Scenario) -> None:
    by_metric = {r[0]: r[1:] for r in scenario.q["metrics"]}
    for nested in ("location.latitude", "location.longitude", "location.speed", "location.satellites"):
        n, numeric, text, _ = by_metric[nested]
        assert n == numeric > 0 and text == 0, nested
    n, numeric, text, flags = by_metric["is_moving"]
    assert n == numeric and sorted(flags) == ["0", "1"]  # bools become 0/1
    for textual in ("location.fix_type", "location.gnss_time", "hardware_key"):
        n, numeric, text, _ = by_metric[textual]
        assert n == text > 0 and numeric == 0, textual
    assert 'custom_Füllstand "Silo/2" #+$' in by_metric  # odd attribute names pass through unchanged
    assert not {"device_id", "message_time", "version", "event_id"} & set(by_metric)  # header fields are attrs
    assert not any(m.startswith("mobile_cells") for m in by_metric)  # arrays give no metric
    assert scenario.q["header_attrs"] == [["1.2", 1]]


def test_device_is_the_ngp_device_id_with_source_and_tracker_ids_in_attrs(scenario: Scenario) -> None:
    """One stable key per series: the NGP device_id every message carries (listed or not in tracker/list); the source
    id IoT Logic uses, the tracker id, label, model and flow are attrs."""
    sim = scenario.sim
    trackers = [sim.tracker(i) for i in range(sim.n)]
    by_device = {r[0]: r[1:] for r in scenario.q["devices"]}
    publishing = {sim.imei(i) for i in sim.publishers() if i >= 0}
    assert set(by_device) == publishing | {sim.orphan}
    assert not set(by_device) & ({str(t["id"]) for t in trackers} | {str(t["source"]["id"]) for t in trackers})
    for t in trackers:
        if t["source"]["device_id"] in by_device:
            assert by_device[t["source"]["device_id"]] == [t["source"]["device_id"], str(t["source"]["id"]), t["label"],
                                                          t["source"]["model"], str(t["id"]),
                                                          str(sim.flow_of(trackers.index(t)))]
    assert by_device[sim.orphan][:3] == [sim.orphan, "", ""]  # not in tracker/list: no source id, no label


def test_nvx_authorization_header_has_the_mandatory_space(scenario: Scenario) -> None:
    api = [r for r in scenario.sim.requests if r.path.startswith("/v2/")]
    assert api and all(r.headers.get("Authorization") == f"NVX {scenario.sim.api_key}" for r in api)
    assert not any(k == "hash" for r in api for k, _ in r.query)  # never the testing-only ?hash=


def test_mapping_list_pages_by_offset_limit_and_count(scenario: Scenario) -> None:
    pages = [dict(r.query) for r in scenario.sim.requests if r.path == "/v2/iot/logic/flow/sources/mapping/list"]
    per_run = [{"offset": str(o), "limit": "2"} for o in (0, 2, 4, 6)]  # count = 7: the last page has one row
    assert pages == per_run * 3


def test_malformed_ngp_messages_become_dead_letters(scenario: Scenario) -> None:
    rows = scenario.q["dead"]
    reasons = [r[0] for r in rows]
    assert len(rows) == len(BAD_MESSAGES)
    assert sum(r.startswith("message_time") for r in reasons) == 2  # missing, and "yesterday"
    assert any(r.startswith("device_id") for r in reasons)
    assert sum(r.startswith("payload: not") for r in reasons) == 2  # not JSON, not an object
    assert any("yesterday" in r for r in reasons)
    assert {r[1] for r in rows} >= {"{not json", "[1, 2, 3]"}
    assert all(r.returncode == 0 for r in scenario.runs)


def test_once_while_the_simulator_publishes_stores_exactly_what_it_published(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The bounded run: `--once` starts, the simulator publishes N messages meanwhile, the run ends when quiet.

    A first, empty run makes the broker session (before it exists the broker keeps nothing for syncd), so the
    messages count whether they land just before the second run subscribes (queued) or while it listens.
    """
    sim = NavixySim(seed=23, trackers=5, mqtt_url=mosquitto.url)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        empty = syncd("run", "--config", str(cfg), "--once")
        assert empty.returncode == 0 and '"mqtt_push.subscribed"' in empty.stderr, empty.stderr[-3000:]
        log = tmp_path / "run.log"
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(cfg), "--once"],
                                    stdout=subprocess.DEVNULL, stderr=err, text=True)
            try:
                asyncio.run(sim.publish(120))
                assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
        (before,) = ch(tmp_path / "data", "SELECT count() FROM syncd.events")
        again = syncd("run", "--config", str(cfg), "--once")
        assert again.returncode == 0, again.stderr[-3000:]
    truth = truth_keys(sim)
    assert len(truth) > 120  # one event per NGP attribute
    assert stored_keys(tmp_path / "data", "navixy") == truth  # keys and values, exactly
    (after, uniq) = ch(tmp_path / "data", "SELECT count() FROM syncd.events", "SELECT uniqExact(event_id) FROM syncd.events")
    assert before == after == uniq == [[len(truth)]]  # the second run added nothing
