"""MQTT sink against a real Mosquitto: every fresh event, retained state, will, outages, back-pressure, topics."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from syncd.errors import VendorAuthError
from syncd.events import Event
from syncd.mqtt_protocol import Connection, MqttError
from syncd.settings import MqttSettings
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sinks.mqtt import MqttSink, topic_level, topic_name
from syncd.sources.mqtt_push import MqttSubscription
from syncd.spool import Batch
from tests.conftest import Mosquitto, free_port
from tests.helpers import ch, logged, popen_syncd, status_row, syncd, syncd_status, write_config
from tests.mqtt_helpers import Subscriber, metrics, retained, wait_for


def _config(tmp: Path, sim: IotOpenSim, broker: Mosquitto, extra: str = "", http_port: int | None = None,
            page_size: int = 500) -> Path:
    cfg = write_config(tmp, [sim], f'\n[mqtt]\nurl = "{broker.url}"\n{extra}\n[clickhouse]\nbatch_age = "200ms"\n')
    text = cfg.read_text().replace('interval = "5s"', f'interval = "1s"\npage_size = {page_size}')
    if http_port:
        text = text.replace('http = ""', f'http = "127.0.0.1:{http_port}"')
    cfg.write_text(text)
    return cfg


def _total(m: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


def _stored_ids(data: Path) -> set[int]:
    (rows,) = ch(data, "SELECT toString(event_id) FROM syncd.events FINAL")
    return {int(r[0]) for r in rows}


def _once_under_subscriber(tmp: Path, sim: IotOpenSim, broker: Mosquitto, extra: str = "") -> list[tuple[str, Any]]:
    """`syncd run --once` with a subscriber on `syncd/#` started before it; the (topic, payload) events it got."""
    sub = Subscriber(broker.port)
    try:
        with sims_in_thread([sim]):
            r = syncd("run", "--config", str(_config(tmp, sim, broker, extra)), "--once")
            assert r.returncode == 0, r.stderr[-3000:]
        sub.wait_quiet()
        return sub.events()
    finally:
        sub.close()


def test_subscriber_sees_every_fresh_event(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim = IotOpenSim(seed=31, installations=2, topics_per_installation=6, log_points=4000, history=600)
    events = _once_under_subscriber(tmp_path, sim, mosquitto)
    stored = _stored_ids(tmp_path / "data")
    assert len(stored) == 4000 + 12
    seen = {int(p["event_id"]) for _, p in events}
    assert seen == stored
    # the payload of DESIGN.md, with ts in ISO 8601 UTC milliseconds; history is not retained
    topic, first = events[0]
    assert set(first) == {"event_id", "source", "kind", "ts", "value", "text", "attrs"}
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert topic.startswith("syncd/iotopen/") and topic.count("/") == 4


def test_backfill_older_than_max_age_goes_to_clickhouse_only(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim = IotOpenSim(seed=32, installations=1, topics_per_installation=4, log_points=1000, history=6 * 3600)
    seen = {int(p["event_id"]) for _, p in _once_under_subscriber(tmp_path, sim, mosquitto, 'max_age = "1h"')}
    (fresh, total) = ch(tmp_path / "data",
                        "SELECT toString(event_id) FROM syncd.events FINAL WHERE ts >= now64(3) - INTERVAL 55 MINUTE",
                        "SELECT count() FROM syncd.events FINAL")
    fresh_ids = {int(r[0]) for r in fresh}
    assert total[0][0] == 1004
    assert 0 < len(seen) < 1004
    assert fresh_ids <= seen  # everything fetched within the hour went out (a margin for run time)


def test_broker_outage_mid_run_loses_nothing_and_clickhouse_never_waits(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim = IotOpenSim(seed=33, installations=2, topics_per_installation=5, log_points=12_000, history=600)
    port = free_port()
    sub = Subscriber(mosquitto.port, client_id="alerts-pipeline", persistent=True)
    with sims_in_thread([sim]):
        sim.faults.slow = 0.03  # the run takes a few seconds, so the broker can die in the middle of it
        cfg = _config(tmp_path, sim, mosquitto, http_port=port, page_size=200)
        proc = popen_syncd("run", "--config", str(cfg), stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _total(metrics(port), "syncd_sink_rows_total", sink="mqtt") > 0)
            mosquitto.stop()
            down_at = _total(metrics(port), "syncd_sink_rows_total", sink="mqtt")
            # while the broker is down, ClickHouse takes every fetched event; the MQTT backlog waits in the spool
            wait_for(lambda: (m := metrics(port)) and _total(m, "syncd_events_total") == 12_010
                     and _total(m, "syncd_sink_rows_total", sink="clickhouse") == 12_010)
            m = metrics(port)
            assert _total(m, "syncd_sink_rows_total", sink="mqtt") < 12_010
            assert _total(m, "syncd_sink_errors_total", sink="mqtt") >= 1
            assert down_at < 12_010
            mosquitto.start()
            wait_for(lambda: _total(metrics(port), "syncd_sink_rows_total", sink="mqtt") >= 12_010, timeout=90)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    assert proc.returncode == 0
    wait_for(lambda: sub.event_ids() >= _stored_ids(tmp_path / "data"), timeout=30, every=1.0)
    sub.close()
    assert len(_stored_ids(tmp_path / "data")) == 12_010


def test_retained_status_is_newest_and_state_topic_tracks_the_daemon(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim = IotOpenSim(seed=34, installations=2, topics_per_installation=4, log_points=200, history=600, live=True)
    port = free_port()
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, sim, mosquitto, http_port=port)
        for _ in range(2):  # the live simulator moves on between runs: the second status is newer
            r = syncd("run", "--config", str(cfg), "--once")
            assert r.returncode == 0, r.stderr[-3000:]
            time.sleep(1.2)
        state = "syncd/_syncd/syncd-0/state"
        assert retained(mosquitto.port, state) == {state: b"offline"}  # a clean stop leaves offline
        keep = retained(mosquitto.port, "syncd/iotopen/#")
        (newest,) = ch(tmp_path / "data", "SELECT tenant, device, metric, toString(argMax(event_id, ts)) "
                                          "FROM syncd.events FINAL WHERE kind = 'status' GROUP BY tenant, device, metric")
        want = {f"syncd/iotopen/{topic_level(t)}/{topic_level(d)}/{topic_level(mt)}": int(e) for t, d, mt, e in newest}
        assert {t: int(json.loads(p)["event_id"]) for t, p in keep.items()} == want
        assert all(json.loads(p)["kind"] == "status" for p in keep.values())

        proc = popen_syncd("run", "--config", str(cfg), stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: retained(mosquitto.port, state, wait=0.3).get(state) == b"online", timeout=60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        wait_for(lambda: retained(mosquitto.port, state, wait=0.3).get(state) == b"offline", timeout=30)


def test_hostile_names_make_distinct_valid_topics(mosquitto: Mosquitto) -> None:
    names = ["a/b", "a", "+", "#", "$SYS", "x\x00y", "%2F", "a%2Fb", "plain"]
    for n in names:
        level = topic_level(n)
        assert not any(c in level for c in "/+#\x00") and not level.startswith("$") and topic_name(level) == n
    assert len({topic_level(n) for n in names}) == len(names)

    async def scenario() -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        now = int(time.time() * 1000)
        events = [Event("src", "ven", "log", "ten", dev, metric, now - i) for i, (dev, metric) in enumerate(
            [(d, m) for d in names for m in ("m", "b/m", "#", "+")])]
        expected: dict[str, set[int]] = {}
        for e in events:
            expected.setdefault(e.device, set()).add(e.event_id)
        got: dict[str, set[int]] = {d: set() for d in names}
        clients = [aiomqtt.Client("127.0.0.1", mosquitto.port) for _ in names]
        for client, d in zip(clients, names, strict=True):  # one single-level wildcard per device, one client each
            await client.__aenter__()
            await client.subscribe(f"syncd/ven/ten/{topic_level(d)}/+", qos=1)
        sink = MqttSink(MqttSettings(url=mosquitto.url), instance="hostile/+#")
        await sink.write(Batch("mqtt", 1, 1, "t", [{"e": [e.row() for e in events], "at": time.time()}]))
        await sink.close()

        async def collect(client: aiomqtt.Client, device: str) -> None:
            async for msg in client.messages:
                levels = str(msg.topic).split("/")
                assert len(levels) == 5, msg.topic
                assert topic_name(levels[3]) == device  # the wildcard matched this device and no other
                got[device].add(int(json.loads(msg.payload)["event_id"]))  # type: ignore[arg-type]

        try:
            await asyncio.wait_for(asyncio.gather(*(collect(c, d) for c, d in zip(clients, names, strict=True))), 3)
        except TimeoutError:
            pass
        for client in clients:
            await client.__aexit__(None, None, None)
        return expected, got

    expected, got = asyncio.run(scenario())
    assert got == expected
    state = retained(mosquitto.port, "syncd/_syncd/#")
    assert list(state) == [f"syncd/_syncd/{topic_level('hostile/+#')}/state"]  # the instance name adds no level


def _small_spool_daemon(tmp: Path, sim: IotOpenSim, broker: Mosquitto, port: int, on_full: str,
                        *args: str) -> subprocess.Popen[str]:
    """A daemon whose spool holds ~4 pages (64 KiB) of 100 events, so a broker outage fills it quickly."""
    cfg = _config(tmp, sim, broker, http_port=port, page_size=100)
    cfg.write_text(cfg.read_text() + f'\n[spool]\nmax_bytes = "64KiB"\non_full = "{on_full}"\n')
    return popen_syncd("run", "--config", str(cfg), *args, stderr=subprocess.PIPE)


def test_full_spool_with_broker_down_pauses_pollers_then_resumes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim, port = IotOpenSim(seed=35, installations=1, topics_per_installation=5, log_points=6000, history=600), free_port()
    mosquitto.stop()
    with sims_in_thread([sim]):
        proc = _small_spool_daemon(tmp_path, sim, mosquitto, port, "block", "--once")
        try:
            wait_for(lambda: metrics(port).get("syncd_pollers_paused") == 1)
            paused_at = _total(metrics(port), "syncd_events_total")
            time.sleep(1.5)
            m = metrics(port)
            assert _total(m, "syncd_events_total") == paused_at < 6005  # nothing fetched while full
            # ClickHouse takes everything fetched while MQTT is stuck (its first insert may wait for start-up)
            wait_for(lambda: _total(metrics(port), "syncd_sink_rows_total", sink="clickhouse") == paused_at)
            assert _total(metrics(port), "syncd_events_total") == paused_at  # still paused
            mosquitto.start()
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert '"spool.full_pausing_pollers"' in err and '"spool.room_again"' in err
    assert len(_stored_ids(tmp_path / "data")) == 6005


def test_full_spool_drop_oldest_counts_what_mqtt_lost(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim, port = IotOpenSim(seed=36, installations=1, topics_per_installation=5, log_points=6000, history=600), free_port()
    mosquitto.stop()
    with sims_in_thread([sim]):
        proc = _small_spool_daemon(tmp_path, sim, mosquitto, port, "drop_oldest")
        try:
            wait_for(lambda: (m := metrics(port)) and _total(m, "syncd_events_total") == 6005
                     and _total(m, "syncd_sink_rows_total", sink="clickhouse") == 6005)
            dropped = _total(metrics(port), "syncd_spool_dropped_rows_total", sink="mqtt")
            assert dropped > 0
            mosquitto.start()
            wait_for(lambda: (m := metrics(port)) and _total(m, "syncd_sink_rows_total", sink="mqtt")
                     + _total(m, "syncd_spool_dropped_rows_total", sink="mqtt") == 6005, timeout=90)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert '"spool.full_dropped_oldest"' in err  # warned, and counted above: never silent
    assert len(_stored_ids(tmp_path / "data")) == 6005


def test_once_with_the_broker_down_exits_1_keeps_the_backlog_and_sends_it_next_run(tmp_path: Path,
                                                                                  mosquitto: Mosquitto) -> None:
    sim = IotOpenSim(seed=37, installations=1, topics_per_installation=4, log_points=800, history=600)
    mosquitto.stop()
    with sims_in_thread([sim]):
        # the broker takes anyone; the password still must never reach a log line, even while connects fail
        cfg = _config(tmp_path, sim, mosquitto, 'username = "syncd"\npassword = "${MQTT_PASSWORD}"')
        started = time.monotonic()
        down = syncd("run", "--config", str(cfg), "--once", env={"MQTT_PASSWORD": "very-secret-mqtt-pass"})
        took = time.monotonic() - started
        assert down.returncode == 1, down.stderr[-3000:]
        assert logged(down.stderr, "syncd.flush_incomplete", sink="mqtt")
        assert took < 120  # a dead broker does not hold a cron run for the whole flush bound (600 s)
        status = syncd_status(cfg, env={"MQTT_PASSWORD": "very-secret-mqtt-pass"})
        assert [status_row(status.stdout, "sinks", sink=name)["backlog rows"] for name in ("mqtt", "clickhouse")] == [
            "804", "0"], status.stdout
        mosquitto.start()
        sub = Subscriber(mosquitto.port)
        try:
            up = syncd("run", "--config", str(cfg), "--once", env={"MQTT_PASSWORD": "very-secret-mqtt-pass"})
            assert up.returncode == 0, up.stderr[-3000:]
            assert "very-secret-mqtt-pass" not in down.stdout + down.stderr + up.stdout + up.stderr
            sub.wait_quiet()
            seen = sub.event_ids()
        finally:
            sub.close()
    assert seen == _stored_ids(tmp_path / "data") and len(seen) == 804


def test_qos_0_and_qos_2_deliver_every_event_once(mosquitto: Mosquitto) -> None:
    """QoS 2 finishes each publish with PUBREC/PUBREL/PUBCOMP; QoS 0 returns once a PINGRESP shows the broker read all.

    3000 QoS 2 publishes in one batch are far over Mosquitto's quota of QoS 2 publishes awaiting PUBREL (100 here):
    one over it would be dropped, yet acknowledged.
    """
    now = int(time.time() * 1000)
    sent: dict[int, set[int]] = {}
    sub = Subscriber(mosquitto.port)

    async def scenario() -> None:
        for qos in (0, 2):
            events = [Event("src", "ven", "log", f"q{qos}", f"dev{i % 7}", f"m{i % 3}", now - i, float(i)) for i in range(3000)]
            sent[qos] = {e.event_id for e in events}
            sink = MqttSink(MqttSettings(url=mosquitto.url, qos=qos), instance=f"qos{qos}")
            try:
                assert await sink.write(Batch("mqtt", 1, 1, "t", [{"e": [e.row() for e in events], "at": time.time()}])) == 0
                assert sink.published == 3000
            finally:
                await sink.close()

    try:
        asyncio.run(scenario())
        wait_for(lambda: len(sub.events()) >= 6000, timeout=30)
        sub.wait_quiet(quiet=0.5)
        got = [(t.split("/")[2], int(p["event_id"])) for t, p in sub.events()]
    finally:
        sub.close()
    assert sorted(got) == sorted([("q0", e) for e in sent[0]] + [("q2", e) for e in sent[2]])


async def _packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet as (first byte, the rest after the remaining length)."""
    first, size, shift = (await reader.readexactly(1))[0], 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return first, await reader.readexactly(size)


async def _fake_broker(serve: Any) -> tuple[asyncio.Server, int]:
    """A broker on port 0 that answers CONNECT with CONNACK 0, then hands the stream to `serve(reader, writer)`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, _ = await _packet(reader)
        assert first == 0x10
        writer.write(b"\x20\x02\x00\x00")
        try:
            await serve(reader, writer)
        except asyncio.IncompleteReadError:
            pass  # the client went away
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_publish_keeps_at_most_the_window_in_flight_and_fails_when_acks_stop() -> None:
    async def scenario() -> tuple[list[int], list[int], str]:
        acked_ids: list[int] = []
        silent_ids: list[int] = []

        async def acking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:  # acknowledge in groups of 5, newest first: order does not matter, only that each is acked
                group = []
                for _ in range(5):
                    first, body = await _packet(reader)
                    assert first >> 4 == 3 and (first >> 1) & 3 == 1
                    group.append(body[2 + int.from_bytes(body[:2], "big"):][:2])
                acked_ids.extend(int.from_bytes(m, "big") for m in group)
                writer.write(b"".join(b"\x40\x02" + m for m in reversed(group)))

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:  # reads every publish, acknowledges none
                first, body = await _packet(reader)
                if first >> 4 == 3:
                    silent_ids.append(int.from_bytes(body[2 + int.from_bytes(body[:2], "big"):][:2], "big"))

        messages = [(f"t/{i}", b"x" * i, False) for i in range(25)]
        server, port = await _fake_broker(acking)
        async with server:
            conn = Connection("window-test")
            await conn.connect("127.0.0.1", port)
            await conn.publish(messages, 1, window=10, timeout=10)  # returns: all 25 acknowledged
            conn.abort()
        server, port = await _fake_broker(silent)
        async with server:
            conn = Connection("silent-test")
            await conn.connect("127.0.0.1", port)
            with pytest.raises(MqttError) as err:
                await conn.publish(messages, 1, window=10, timeout=0.5)
            conn.abort()
        return acked_ids, silent_ids, str(err.value)

    acked_ids, silent_ids, reason = asyncio.run(scenario())
    assert acked_ids == list(range(1, 26))
    assert silent_ids == list(range(1, 11))  # the window, and not one publish more without an acknowledgement
    assert reason == "10 publishes unacknowledged for 0.5 s"


def test_keepalive_pings_and_a_broker_that_stops_answering_ends_the_connection() -> None:
    async def scenario() -> tuple[list[int], str]:
        seen: list[int] = []

        async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                first, _ = await _packet(reader)
                seen.append(first)

        server, port = await _fake_broker(deaf)
        async with server:
            conn = Connection("keepalive-test", keepalive=1)
            await conn.connect("127.0.0.1", port)
            with pytest.raises(MqttError) as err:
                await asyncio.wait_for(conn.receive(), 10)
        return seen, str(err.value)

    seen, reason = asyncio.run(scenario())
    assert seen == [0xC0]  # one PINGREQ after half the keepalive of silence, then the connection is given up
    assert reason == "no PINGRESP within 0.5 s"


def test_push_subscription_with_a_wrong_password_is_an_auth_error(tmp_path: Path) -> None:
    import getpass
    import shutil

    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), "navixy", "right-pass"], check=True, capture_output=True)
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.conf.write_text(f"user {getpass.getuser()}\nlistener {broker.port} 127.0.0.1\nallow_anonymous false\n"
                           f"password_file {tmp_path}/passwd\n")
    broker.start()

    async def run(password: str) -> list[list[str]]:
        got: list[list[str]] = []
        sub = MqttSubscription(f"mqtt://127.0.0.1:{broker.port}", ["ngp/#"], client_id="auth-test",
                               username="navixy", password=password, timeout=10)

        async def handle(batch: list[aiomqtt.Message]) -> None:
            got.append([str(m.topic) for m in batch])

        await sub.run(handle, asyncio.Event(), idle=0.3)
        return got

    try:
        with pytest.raises(VendorAuthError, match=r"refused the MQTT credentials: connection refused \(5: not authorized\)"):
            asyncio.run(run("wrong-pass"))
        assert asyncio.run(run("right-pass")) == []  # subscribed, quiet for `idle`, returned
    finally:
        broker.stop()
