"""Poison records never wedge the MQTT sink: hostile names become valid topics, unpublishable rows are refused.

Topic levels are checked against what Mosquitto itself refuses (it disconnects a client that publishes
to a topic with a control character, a non-character or a lone surrogate); rows that can never become
a message make `MqttSink.write` raise `RowsRefused` naming the field, before anything of the batch is
published, while the good rows of the same data go out to a real subscriber.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

import aiomqtt
import pytest

from syncd.errors import RowsRefused
from syncd.events import ms_to_iso
from syncd.settings import MqttSettings
from syncd.sinks import mqtt as mqtt_sink
from syncd.sinks.mqtt import MAX_LEVEL_BYTES, MqttSink, iso_ms, topic_level, topic_name
from syncd.spool import Batch
from tests.conftest import Mosquitto
from tests.mqtt_helpers import Subscriber, wait_for

# Every code point Mosquitto refuses in a topic (mosquitto_validate_utf8), plus the wildcards and `/`.
REFUSED = re.compile("[/+#\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
                     + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(17)) + "]")

HOSTILE = [
    "line\nbreak", "tab\there", "bell\x07", "esc\x1b[31mred", "del\x7f", "c1\x85next", "c1\x9f", "nul\x00byte", "\x00",
    "\x01\x02\x03", "lone \ud83d high", "lone \ude00 low", "\ud83d\ude00", "\U0001f600", "nonchar \ufdd0", "\ufffe\uffff",
    "plane16 \U0010ffff", "%", "%00", "%0A", "%ED%A0%BD", "a/b", "+", "#", "$SYS", "$", " ", "",
    "line\u2028separator", "\ufeffbom", "mixed/\x00+#%\n\ud800",
]


def test_hostile_names_become_levels_mosquitto_accepts_and_come_back() -> None:
    for name in HOSTILE:
        level = topic_level(name)
        assert REFUSED.search(level) is None, (name, level)
        assert not level.startswith("$"), (name, level)
        assert len(level.encode()) <= MAX_LEVEL_BYTES
        assert topic_name(level) == name, (name, level)
    assert len({topic_level(n) for n in HOSTILE}) == len(HOSTILE)  # one-to-one


def test_escapes_are_the_utf8_bytes_and_names_that_were_valid_keep_their_level() -> None:
    assert topic_level("a\nb") == "a%0Ab"
    assert topic_level("x\x00y") == "x%00y"
    assert topic_level("\x7f\x85") == "%7F%C2%85"
    assert topic_level("\ud83d") == "%ED%A0%BD"  # a lone surrogate, as its "surrogatepass" bytes
    assert topic_level("\uffff") == "%EF%BF%BF"
    assert topic_level("$SYS") == "%24SYS"
    assert topic_level("a/b+c#d%e") == "a%2Fb%2Bc%23d%25e"  # unchanged from before the control-character escapes
    assert topic_level("Pannrum #2 / \"Nord\" +$") == "Pannrum %232 %2F \"Nord\" %2B$"
    assert topic_level("zwave/12/temperature °C ä") == "zwave%2F12%2Ftemperature °C ä"


def test_long_names_are_shortened_deterministically_and_stay_distinct() -> None:
    head = "device-" * 150_000  # ~1 MB
    names = [head + "a", head + "b", head[:-1], "x" * 257, "x" * 258, "é" * 200, "%" * 300, "\n" * 300,
             "\ud83d" * 100, "€" * 100_000]
    levels = [topic_level(n) for n in names]
    assert len(set(levels)) == len(names)  # a shared 1 MB prefix still makes two topics
    for name, level in zip(names, levels, strict=True):
        assert len(level.encode()) <= MAX_LEVEL_BYTES, name[:20]
        assert REFUSED.search(level) is None
        assert re.fullmatch(r".*%~[0-9a-f]{32}", level), level
        assert mqtt_sink._level(name) == level  # the same name always maps to the same topic (no cache involved)
    assert levels[0].startswith("device-device-")
    assert levels[6].startswith("%25%25") and re.fullmatch(r"(%25)*%~[0-9a-f]{32}", levels[6])  # no escape cut in half
    assert re.fullmatch(r"(%0A)*%~[0-9a-f]{32}", levels[7])
    assert re.fullmatch(r"(%ED%A0%BD)*%~[0-9a-f]{32}", levels[8])  # a character's escapes stay together
    assert topic_name(levels[8]).partition("%~")[0] == "\ud83d" * ((MAX_LEVEL_BYTES - 2 - 32) // 9)  # prefix + hash
    assert topic_name(levels[0]).startswith("device-device-")
    # at the bound nothing is shortened, and the level still comes back; one byte more and it is shortened
    assert topic_level("x" * MAX_LEVEL_BYTES) == "x" * MAX_LEVEL_BYTES
    assert topic_name(topic_level("é" * (MAX_LEVEL_BYTES // 2))) == "é" * (MAX_LEVEL_BYTES // 2)
    assert "%~" in topic_level("x" * (MAX_LEVEL_BYTES + 1))
    # a shortened level never equals an unshortened one, even of a name spelled like it
    assert topic_level(levels[3]) != levels[3]


def test_iso_ms_is_the_payload_format_with_a_four_digit_year() -> None:
    for ts in (0, 1, -1, 999, -1500, 1_700_000_000_123, 253_402_300_799_999, 946_684_800_000):
        assert iso_ms(ts) == ms_to_iso(ts)
    assert iso_ms(-62_135_596_800_000) == "0001-01-01T00:00:00.000Z"
    assert iso_ms(-30_610_224_000_000) == "1000-01-01T00:00:00.000Z"
    assert iso_ms(-30_610_224_000_001) == "0999-12-31T23:59:59.999Z"
    with pytest.raises(OverflowError):
        iso_ms(253_402_300_800_000)  # year 10000
    with pytest.raises(OverflowError):
        iso_ms(-62_135_596_800_001)  # year 0


def _row(eid: int, vendor: str, kind: str, tenant: str, device: str, metric: str, ts: int, value: Any = None,
         text: Any = None, attrs: Any = None) -> list[Any]:
    """A spool row in COLUMNS order (built by hand: Event.event_id cannot hash a lone surrogate)."""
    return [eid, "src", vendor, kind, tenant, device, metric, ts, value, text, attrs or {}]


def _rows(now: int) -> list[list[Any]]:
    """Good rows: every hostile name in some level, a 1 MB device name, and one status row."""
    rows = [_row(1000 + i, "ven", "log", "ten", name, "m", now - i, float(i)) for i, name in enumerate(HOSTILE)]
    rows.append(_row(2000, "ven\x00dor", "log", "ten\n", "d" * 1_000_000, "m\x85", now - 100, None, "ok"))
    rows.append(_row(2001, "ven", "status", "ten", "dev", "state\x1b", now - 200, 1.0, None, {"unit": "°C"}))
    return rows


def _topic(row: list[Any]) -> str:
    return "/".join(["syncd", *(topic_level(row[i]) for i in (2, 4, 5, 6))])


POISON = [  # (field the refusal names, column, bad value)
    ("ts", 7, 1_000_000_000_000_000),  # year 33658
    ("ts", 7, 1.7e12),  # not integer milliseconds
    ("ts", 7, None),
    ("text", 9, "lone \udc80 surrogate"),
    ("attrs", 10, {"unit": "\ud800"}),
    ("value", 8, 2**70),  # an integer JSON (orjson) cannot carry
    ("source", 1, "src\udfff"),
    ("device", 5, None),
    ("tenant", 4, 42),
    ("event_id", 0, -1),
]


@pytest.mark.parametrize(("field", "col", "bad"), POISON, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(POISON)])
def test_a_poison_row_is_refused_before_anything_is_published_and_the_good_rows_go_out(
        field: str, col: int, bad: Any, mosquitto: Mosquitto) -> None:
    now = int(time.time() * 1000)
    good = _rows(now)
    poison = _row(3000, "ven", "log", "ten", "poisoned", "m", now - 300, 3.0)
    poison[col] = bad
    mixed = good[:5] + [poison] + good[5:]
    sub = Subscriber(mosquitto.port)

    async def scenario() -> tuple[str, int, int]:
        sink = MqttSink(MqttSettings(url=mosquitto.url), instance="poison")
        try:
            with pytest.raises(RowsRefused) as refused:
                await sink.write(Batch("mqtt", 1, 1, "t1", [{"e": mixed, "at": time.time()}]))
            published_after_refusal = sink.published
            skipped = await sink.write(Batch("mqtt", 1, 1, "t2", [{"e": good, "at": time.time()}]))
            assert skipped == 0
            return str(refused.value), published_after_refusal, sink.published
        finally:
            await sink.close()

    try:
        reason, after_refusal, after_good = asyncio.run(scenario())
        # the good batch went out on the connection the refused one used; once all of it has arrived, anything
        # the refused batch had published (earlier, same connection, QoS 1, in order) would have arrived too
        wait_for(lambda: len(sub.events()) >= len(good), timeout=30)
        events = sub.events()
    finally:
        sub.close()
    assert reason.startswith(f"{field}: "), reason
    assert after_refusal == 0 and after_good == len(good)
    assert sorted(int(p["event_id"]) for _, p in events) == sorted(r[0] for r in good)  # exactly the good rows, once
    assert {t: int(p["event_id"]) for t, p in events} == {_topic(r): r[0] for r in good}
    assert {topic_name(t.split("/")[3]) for t, _ in events} >= set(HOSTILE)
    assert all(len(t.encode()) <= 4 + 5 * MAX_LEVEL_BYTES for t, _ in events)


def test_a_timestamp_too_old_to_format_is_only_skipped(mosquitto: Mosquitto) -> None:
    """Older than max_age is ClickHouse-only, so a ts before year 1 is counted as skipped, not refused."""
    now = int(time.time() * 1000)
    row = _row(1, "ven", "log", "ten", "dev", "m", now, 1.0)
    old = list(row)
    old[7] = -70_000_000_000_000  # before year 1

    async def scenario() -> tuple[int, int]:
        sink = MqttSink(MqttSettings(url=mosquitto.url), instance="poison-old")
        try:
            skipped = await sink.write(Batch("mqtt", 1, 1, "t", [{"e": [old, row], "at": time.time()}]))
            return skipped, sink.published
        finally:
            await sink.close()

    assert asyncio.run(scenario()) == (1, 1)


@pytest.mark.parametrize(("row", "reason"), [
    ([1, 2, 3], "row: must hold the 11 event columns"),
    ("not a row", "row: must hold the 11 event columns"),
])
def test_a_malformed_row_is_refused(row: Any, reason: str, mosquitto: Mosquitto) -> None:
    async def scenario() -> str:
        sink = MqttSink(MqttSettings(url=mosquitto.url), instance="poison-shape")
        try:
            with pytest.raises(RowsRefused) as refused:
                await sink.write(Batch("mqtt", 1, 1, "t", [{"e": [row], "at": time.time()}]))
            return str(refused.value)
        finally:
            await sink.close()

    assert asyncio.run(scenario()).startswith(reason)


def test_with_the_broker_down_attempts_reuse_one_client_and_build_no_messages(mosquitto: Mosquitto) -> None:
    """A long outage costs no memory per attempt: one client object (and TLS context), no payloads built."""
    now = int(time.time() * 1000)
    rows = [_row(5000 + i, "ven", "log", "ten", f"dev{i}", "m", now - i, float(i)) for i in range(50)]
    batch = Batch("mqtt", 1, 1, "t", [{"e": rows, "at": time.time()}])
    sub = Subscriber(mosquitto.port, client_id="outage-watcher", persistent=True)  # its session outlives the restarts
    mosquitto.stop()

    async def scenario() -> tuple[int, list[int]]:
        sink = MqttSink(MqttSettings(url=mosquitto.url), instance="outage")
        built = 0
        messages = sink._messages

        def counting(b: Batch) -> Any:
            nonlocal built
            built += 1
            return messages(b)

        sink._messages = counting  # type: ignore[method-assign,assignment]
        made = []
        try:
            for _ in range(5):
                with pytest.raises(aiomqtt.MqttError):
                    await sink.write(batch)
            made.append(sink.clients_made)
            assert built == 0
            assert await sink.write(Batch("mqtt", 1, 1, "m", [{"d": [["reason", "{}", "src"]]}])) == 0  # no broker needed
            mosquitto.start()
            assert await sink.write(batch) == 0
            made.append(sink.clients_made)  # the idle client was the one that connected
            mosquitto.stop()  # a connection that was up and is lost: that client is released, the next is new
            for _ in range(3):
                with pytest.raises(aiomqtt.MqttError):
                    await sink.write(batch)
            made.append(sink.clients_made)
            mosquitto.start()
            assert await sink.write(batch) == 0
            made.append(sink.clients_made)
        finally:
            await sink.close()
        return built, made

    try:
        built, made = asyncio.run(scenario())
        wait_for(lambda: len(sub.events()) >= 2 * len(rows), timeout=30)
        counts = Counter(int(p["event_id"]) for _, p in sub.events())
    finally:
        sub.close()
    assert made == [1, 1, 2, 2]
    assert built == 3  # twice delivered, once on the connection that had died unnoticed; never while disconnected
    # each batch went out once; the watcher's own session may redeliver what was in flight to it at a restart
    assert set(counts) == {r[0] for r in rows} and min(counts.values()) >= 2


def test_tls_attempts_share_one_context() -> None:
    from syncd.sim.broker import free_port

    async def scenario() -> tuple[int, bool]:
        sink = MqttSink(MqttSettings(url=f"mqtts://127.0.0.1:{free_port()}"), instance="tls-outage")
        contexts = set()
        for _ in range(3):
            with pytest.raises(aiomqtt.MqttError):
                await sink.open()
            contexts.add(id(sink._tls()))
        return sink.clients_made, len(contexts) == 1

    assert asyncio.run(scenario()) == (1, True)
