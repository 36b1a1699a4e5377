"""A real MQTT subscriber for tests (paho in its own thread) and a /metrics reader."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt


class Subscriber:
    """Collects every message on `topic` (QoS 1); `persistent` keeps the broker session across reconnects."""

    def __init__(self, port: int, topic: str = "syncd/#", *, client_id: str = "", persistent: bool = False) -> None:
        self.topic = topic
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{time.monotonic_ns()}",
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("subscriber did not connect")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(self.topic, qos=1)
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """(topic, payload) of every event message (the instance state topics left out)."""
        with self.lock:
            return [(t, json.loads(p)) for t, p, _ in self.messages if "/_syncd/" not in t]

    def event_ids(self) -> set[int]:
        return {int(p["event_id"]) for _, p in self.events()}

    def wait_quiet(self, quiet: float = 1.0, timeout: float = 60.0) -> int:
        """Wait until no message arrived for `quiet` seconds; returns the count."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self.lock:
                n = len(self.messages)
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return n
            time.sleep(0.1)
        return last

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained(port: int, topic: str, wait: float = 1.5) -> dict[str, bytes]:
    """The retained messages under `topic` right now (topic → payload)."""
    sub = Subscriber(port, topic)
    try:
        sub.wait_quiet(quiet=wait, timeout=30)
        with sub.lock:
            return {t: p for t, p, r in sub.messages if r}
    finally:
        sub.close()


_LINE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def metrics(port: int) -> dict[str, float]:
    """`name{labels}` → value from the daemon's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def wait_for(predicate: Any, timeout: float = 60.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:  # the daemon's HTTP port is not up yet
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
