"""Navixy quirks a connector could get wrong, each against the simulator (and a real Mosquitto where MQTT is involved)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from syncd.errors import ConfigError
from syncd.http import TokenBucket, VendorClient
from syncd.settings import load
from syncd.sim.common import sims_in_thread
from syncd.sim.navixy import EP_MQTT, STAGING_TOPIC, NavixySim
from syncd.sources.navixy import NavixySource
from tests.conftest import free_port
from tests.helpers import ch, logged, popen_syncd, stored_keys, syncd, truth_keys, write_config
from tests.mqtt_helpers import metrics


def wait_for(path: Path, needle: str, count: int = 1, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count(needle) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle} x{count} not in {path}: {path.read_text()[-3000:] if path.exists() else ''}")


def test_status_stream_polls_flows_and_endpoints_and_retries_vendor_errors(tmp_path: Path) -> None:
    """kind=status per the brief's §8; 503 code 8 / 500 code 1 are vendor errors (retried), not credential errors."""
    sim = NavixySim(seed=31)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\nstreams = ["status"]'))
        sim.faults.update({"error_5xx": 2})
        t0 = int(time.time() * 1000)
        first = syncd("run", "--config", str(cfg), "--once")
        t1 = int(time.time() * 1000)
        second = syncd("run", "--config", str(cfg), "--once")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    assert first.stderr.count('"http.retry"') == 2
    stored = stored_keys(tmp_path / "data", "navixy")
    truth = sim.status_truth(0)
    flows = {(t.kind, t.tenant, t.device, t.metric, t.ts_ms): (t.value, t.text) for t in truth if t.device.startswith("flow:")}
    assert {k: v for k, v in stored.items() if k[2].startswith("flow:")} == flows
    endpoints = {k: v for k, v in stored.items() if k[2].startswith("endpoint:")}
    assert {(k[2], k[3], v[1]) for k, v in endpoints.items()} == {
        (t.device, t.metric, t.text) for t in truth if t.device.startswith("endpoint:")}
    assert all(t0 <= k[4] <= t1 for k in endpoints)  # no vendor time: the poll time
    assert len(stored) == 6  # the second run saw no change and added nothing
    (attrs,) = ch(tmp_path / "data", "SELECT attrs['title'], attrs['devices_count'] FROM syncd.events "
                                     "WHERE device = 'flow:4101'")
    assert attrs == [["Fleet → MQTT #1 (prod)", str(sum(sim.flow_of(i) == 4101 for i in range(sim.n)))]]


def test_auth_failure_is_decided_on_http_status_not_code_number(tmp_path: Path) -> None:
    """The documents disagree on the codes (14 / 3 / 4 / 7): a revoked key (401, code 4) and an unknown key
    (401, code 3) both stop the source with a clear error; neither is code 14 "Invalid session"."""
    sim = NavixySim(seed=32)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        text = cfg.read_text()
        runs = []
        for key in (sim.revoked_key, "f" * 32):
            cfg.write_text(text.replace(sim.api_key, key))
            runs.append((key, syncd("run", "--config", str(cfg), "--once", timeout=60)))
    for (key, r), code in zip(runs, (4, 3), strict=True):
        assert r.returncode == 1, r.stderr[-2000:]
        assert r.stderr.count('"source.failed"') == 1 and f"Navixy code {code}" in r.stderr
        assert key not in r.stderr + r.stdout
    assert [r.path for r in sim.requests].count("/v2/user/get_info") == 2  # refused up front, nothing retried


def test_unacked_messages_of_a_sigkilled_run_are_redelivered(tmp_path: Path, mosquitto: Any) -> None:
    """Ack after commit: a run killed while holding delivered-but-unspooled messages loses none of them."""
    sim = NavixySim(seed=33, mqtt_url=mosquitto.url)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        base = cfg.read_text()
        assert syncd("run", "--config", str(cfg), "--once").returncode == 0  # creates the session
        asyncio.run(sim.publish(400))  # ~850 deliveries: more than one page even if the broker did not wait for acks
        # ClickHouse unreachable and a tiny spool: the first page commits, the next one waits for room, unacked
        cfg.write_text(base + f'\n[clickhouse]\ndsn = "http://127.0.0.1:{free_port()}"\n\n[spool]\nmax_bytes = "1KiB"\n')
        log = tmp_path / "stuck.log"
        with log.open("w") as err:
            proc = popen_syncd("run", "--config", str(cfg), "--once", stderr=err)
            try:
                wait_for(log, '"spool.full_pausing_pollers"')
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
        with sqlite3.connect(tmp_path / "data" / "state.db") as db:
            (spooled,) = db.execute("SELECT COALESCE(SUM(rows), 0) FROM pages WHERE stream = 'telemetry'").fetchone()
        truth = truth_keys(sim)
        assert 0 < spooled < len(truth)  # part was on disk (and acked), the rest only in the killed process
        cfg.write_text(base)
        final = syncd("run", "--config", str(cfg), "--once")
        assert final.returncode == 0, final.stderr[-3000:]
    assert stored_keys(tmp_path / "data", "navixy").keys() == truth.keys()
    (counts,) = ch(tmp_path / "data", "SELECT count(), uniqExact(event_id) FROM syncd.events FINAL")
    assert counts == [[len(truth), len(truth)]]


def test_push_stream_reconnects_after_a_broker_restart_and_stops_on_sigterm(tmp_path: Path, mosquitto: Any) -> None:
    """Daemon mode: the push stream is a long-running task; a broker restart is retried with backoff."""
    sim = NavixySim(seed=35, mqtt_url=mosquitto.url)
    port = free_port()
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('http = ""', f'http = "127.0.0.1:{port}"'))
        log = tmp_path / "daemon.log"
        with log.open("w") as err:
            proc = popen_syncd("run", "--config", str(cfg), stderr=err)
            try:
                wait_for(log, '"mqtt_push.subscribed"')
                asyncio.run(sim.publish(40))
                wait_for_events(port, len(truth_keys(sim)))  # acked before the broker goes (its restart may lose state)
                mosquitto.stop()
                wait_for(log, '"stream.failing"')
                mosquitto.start()
                wait_for(log, '"mqtt_push.subscribed"', count=2)  # reconnected and subscribed again
                asyncio.run(sim.publish(40))
                wait_for_events(port, len(truth_keys(sim)))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert '"stream.recovered"' in text and logged(text, "syncd.stopped", flushed=True)
    assert stored_keys(tmp_path / "data", "navixy").keys() == truth_keys(sim).keys()


def wait_for_events(port: int, want: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and telemetry_events(port) < want:
        time.sleep(0.1)
    assert telemetry_events(port) >= want


def telemetry_events(port: int) -> float:
    return sum(v for k, v in metrics(port).items() if k.startswith("syncd_events_total{") and 'kind="telemetry"' in k)


def test_check_warns_when_no_enabled_flow_publishes_to_the_configured_topics(tmp_path: Path) -> None:
    sim = NavixySim(seed=34, mqtt_url="mqtt://127.0.0.1:1883")
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        entry = cfg.read_text().split("[[sources]]", 1)[1]
        variants = {
            "ok-exact": None,  # the topics the simulator's endpoint publishes to
            "ok-wildcard": '["fleet/navixy/#"]',
            "disabled-flow": f'["{STAGING_TOPIC}"]',  # only the disabled flow's endpoint publishes there
            "half": '["fleet/+/ngp", "nobody/listens/here"]',
        }
        parts = [cfg.read_text().split("[[sources]]", 1)[0]]
        for name, topics in variants.items():
            text = entry.replace('name = "navixy-sim"', f'name = "{name}"')
            if topics is not None:
                text = "\n".join(f"topics = {topics}" if ln.startswith("topics = ") else ln for ln in text.splitlines())
            parts.append("[[sources]]" + text)
        unreachable = entry.replace('name = "navixy-sim"', 'name = "offline"').replace(sim.url, f"http://127.0.0.1:{free_port()}")
        parts.append("[[sources]]" + unreachable)
        cfg.write_text("\n".join(parts))
        r = syncd("check", "--config", str(cfg), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 3, r.stdout
    assert any("sources[2] (disabled-flow).topics[0]" in w and "no enabled Navixy flow" in w for w in warnings)
    assert any("sources[3] (half).topics[1]" in w and "nobody/listens/here" in w for w in warnings)
    assert any("sources[4] (offline): could not check" in w for w in warnings)
    assert "Traceback" not in r.stderr


async def test_region_picks_the_api_root_and_mqtt_url_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text('[[sources]]\nname = "fleet"\nvendor = "navixy"\nregion = "us"\napi_key = "k"\n')
    settings = load(path)
    async with aiohttp.ClientSession() as session:
        source = NavixySource(settings.sources[0], VendorClient(session, TokenBucket(1, 1), timeout=1))
    assert source.root == "https://api.us.navixy.com/v2"
    path.write_text(path.read_text() + 'mqtt_url = "tcp://broker:1883"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.problems == ["sources[0].mqtt_url: must start with mqtt:// or mqtts://"]


def test_push_stream_reports_upstream_health_to_sync_status_while_it_runs(tmp_path: Path, mosquitto: Any) -> None:
    """A subscription never finishes: every interval it writes a sync_status row saying whether Navixy feeds it."""
    sim = NavixySim(seed=36, mqtt_url=mosquitto.url)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "1s"'))
        log = tmp_path / "daemon.log"
        with log.open("w") as err:
            proc = popen_syncd("run", "--config", str(cfg), stderr=err)
            try:
                wait_for(log, '"mqtt_push.subscribed"')
                sim.endpoints[EP_MQTT]["status"] = "suspend"  # someone suspended the operator's output endpoint
                wait_for(log, '"stream.upstream_unhealthy"')
                sim.endpoints[EP_MQTT]["status"] = "active"
                wait_for(log, '"stream.upstream_recovered"')
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    unhealthy = next(line for line in text.splitlines() if '"stream.upstream_unhealthy"' in line)
    assert "Operator broker" in unhealthy and "suspend" in unhealthy
    (rows,) = ch(tmp_path / "data", "SELECT ok, error FROM syncd.sync_status FINAL WHERE stream = 'telemetry'")
    assert rows == [[1, ""]]  # healthy again, and the row came from the running stream
