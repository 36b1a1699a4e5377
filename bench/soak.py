"""Soak: the daemon under random chaos for a while, then an exact check of what it stored and published.

All five vendor simulators run live (steady new data) in this process; Navixy publishes NGP messages to a
private Mosquitto, which is also the daemon's MQTT sink; ClickHouse is the test HTTP server in front of the
embedded engine (tests/chhttp.py); `syncd run` is a subprocess with /metrics on. A persistent MQTT
subscriber (clean_session=False, QoS 1, fixed client id) collects every event_id published under `syncd/#`
for the whole soak, across broker restarts.

For --duration seconds a seeded chaos loop picks, at random intervals: SIGKILL the daemon (restarted after
a few seconds); stop the broker for 5-40 s; stop (SIGTERM) or kill (SIGKILL) the ClickHouse server for
5-60 s; switch the server to answering HTTP 500 for 5-40 s; a simulator fault on a random vendor (429 storm
with or without Retry-After, 5xx, truncated bodies, slow responses). Every injection is logged with its time.
The daemon's VmRSS (/proc/PID/status) and its /metrics counters are sampled every 5 s.

At the end: faults off, broker and server up, the simulated worlds frozen at one instant (Navixy stops
publishing), SIGTERM to the daemon, then `syncd run --once` (once more if it fails) and an exact check:
per vendor, events FINAL against the simulators' ground truth (history kinds: the same keys and values;
snapshot kinds, whose truth is only the current state, e.g. IoT Open status: every truth key stored),
duplicates after FINAL (count() - uniqExact(event_id)), every event_id in ClickHouse seen by the subscriber
(`[mqtt] max_age` is 3650d, so every event is fresh), and dead letters. Exit 0 on PASS, 1 on FAIL.

Usage: python bench/soak.py [--duration 600] [--seed 1] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.chhttp, tests.mqtt_helpers

from syncd.sim.broker import LocalMosquitto, free_port  # noqa: E402
from syncd.sim.common import VendorSim, sims_in_thread  # noqa: E402
from syncd.sim.ioto import LAG as IOTO_LAG  # noqa: E402
from syncd.sim.ioto import IotoSim  # noqa: E402
from syncd.sim.iotopen import IotOpenSim  # noqa: E402
from syncd.sim.ixon import IxonSim  # noqa: E402
from syncd.sim.navixy import NavixySim  # noqa: E402
from syncd.sim.proxus import LAG_MS as PROXUS_LAG_MS  # noqa: E402
from syncd.sim.proxus import WRITE_MS as PROXUS_WRITE_MS  # noqa: E402
from syncd.sim.proxus import ProxusSim  # noqa: E402
from syncd.sim.server import config_toml  # noqa: E402
from tests.chhttp import ClickHouseHttp  # noqa: E402
from tests.mqtt_helpers import Subscriber, metrics  # noqa: E402

Key = tuple[str, str, str, str, int]
VENDORS = ("iotopen", "proxus", "ioto", "ixon", "navixy")
# Kinds whose live truth is only the current state: a daemon polling all along also stores older states.
SNAPSHOT_KINDS = {"iotopen": {"status"}, "ioto": {"status", "metric"}}
SIM_FAULTS = ("storm_429", "error_5xx", "truncate", "slow")
SAMPLE_S = 5.0
NAVIXY_RATE = 2.0  # NGP messages/s
STALL_WARN_S = 30.0  # a daemon fetching nothing for this long is reported (the worlds never stand still)


# -- the simulated worlds -------------------------------------------------------------------------------

class WorldClock:
    """A simulator's clock: real time until frozen, so the final check compares against one fixed world."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> float:
        return time.time() if self.at is None else self.at


class SoakNavixy(NavixySim):
    """NavixySim that remembers messages whose publish failed (the broker went away): their fate is unknown.

    The simulator records a chunk of messages as published only when every PUBACK came back; when the broker
    stops mid-chunk, some of it may already sit in syncd's session. Those (publisher, second) pairs are kept
    here so the check can tell them from rows nobody published.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)  # publish_rate=0: publishing starts once syncd has its broker session
        self.uncertain: set[tuple[int, int]] = set()
        self.emit_failures = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def add_routes(self, app: Any) -> None:
        super().add_routes(app)

        async def grab_loop(_app: Any) -> None:
            self.loop = asyncio.get_running_loop()
            default = self.loop.get_exception_handler()

            def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
                if isinstance(context.get("exception"), aiomqtt.MqttError):  # a publish cut by a broker stop
                    return
                if default is not None:
                    default(loop, context)
                else:
                    loop.default_exception_handler(context)

            self.loop.set_exception_handler(quiet)

        app.on_startup.append(grab_loop)

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the simulators' event loop (their thread) and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    async def _emit(self, clients: Any, plan: list[tuple[int, int]]) -> None:
        try:
            await super()._emit(clients, plan)
        except BaseException:
            self.emit_failures += 1
            self.uncertain.update((p, ts) for p, ts in plan if ts not in self._published.get(p, ()))
            raise

    def uncertain_truth(self) -> dict[Key, tuple[Any, Any]]:
        """Ground-truth rows of the messages whose publish failed and were never published again."""
        left = {}
        for p, ts in self.uncertain:
            if ts not in self._published.get(p, ()):
                left.setdefault(p, []).append(ts)
        saved = self._published
        try:
            self._published = left
            rows = NavixySim.ground_truth(self)
        finally:
            self._published = saved
        return {(t.kind, t.tenant, t.device, t.metric, t.ts_ms): (t.value, t.text) for t in rows}


def make_sims(seed: int, broker_url: str) -> tuple[list[VendorSim], dict[str, WorldClock]]:
    clocks = {v: WorldClock() for v in VENDORS if v != "navixy"}  # Navixy's world is what it published
    sims: list[VendorSim] = [
        # 24 topics, a point every 2 s each: 12 events/s, a 30-minute backlog of ~21k
        IotOpenSim(seed, clock=clocks["iotopen"], live=True, installations=3, topics_per_installation=8,
                   log_points=24 * 870, history=1800),
        # 20 series every 2 s: 10 events/s (+ an alert every 87 s), ~17k backlog
        ProxusSim(seed, clock=clocks["proxus"], live=True, devices=5, keys_per_device=4, rows=20 * 870,
                  history=1800, alerts=20),
        # a log every 0.5 s, Store items, rolling metrics, alerts; 2 h of history (the sim's minimum)
        IotoSim(seed, clock=clocks["ioto"], live=True, devices=6, logs=14_280, history=7200),
        # 36 tags, a point every 3 s each: 12 events/s, ~22k backlog
        IxonSim(seed, clock=clocks["ixon"], live=True, agents=3, tags_per_agent=12, points_per_tag=600,
                history=1800),
        # NGP messages to two topics (plus QoS 1 repeats), a dozen events each; NAVIXY_RATE/s once syncd listens
        SoakNavixy(seed, live=True, trackers=6, mqtt_url=broker_url, publish_rate=0.0),
    ]
    for sim in sims:  # rate limits keep real time: a frozen world must not freeze its sliding windows
        for limit in [*sim.limits, *([sim.intake] if isinstance(sim, IxonSim) else [])]:
            limit.clock = time.time
    return sims, clocks


def truth_keys(sim: VendorSim) -> dict[Key, tuple[Any, Any]]:
    return {(t.kind, t.tenant, t.device, t.metric, t.ts_ms): (t.value, t.text) for t in sim.ground_truth()}


# -- the persistent subscriber ------------------------------------------------------------------------

class IdSubscriber(Subscriber):
    """tests.mqtt_helpers.Subscriber keeping only event ids (a soak publishes too much to keep payloads)."""

    def __init__(self, port: int, client_id: str) -> None:
        self.ids: set[int] = set()
        self.received = 0
        self.bad = 0
        self.connects = 0
        super().__init__(port, "syncd/#", client_id=client_id, persistent=True)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connects += 1
        super()._on_connect(client, userdata, flags, reason, properties)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if "/_syncd/" in msg.topic:
            return
        try:
            eid = int(json.loads(msg.payload)["event_id"])
        except (ValueError, KeyError, TypeError):
            with self.lock:
                self.bad += 1
            return
        with self.lock:
            self.ids.add(eid)
            self.received += 1

    def wait_quiet(self, quiet: float = 3.0, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self.lock:
                n = self.received
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.2)
        return last


# -- the daemon ---------------------------------------------------------------------------------------

@dataclass
class Life:
    pid: int
    started: float  # seconds into the soak
    ended: float | None = None
    how: str = ""  # SIGKILL / SIGTERM rc=N / exited rc=N


class Daemon:
    def __init__(self, cfg: Path, log: Path, t0: float) -> None:
        self.cfg, self.log, self.t0 = cfg, log, t0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives: list[Life] = []

    def _mark(self, text: str) -> None:
        with open(self.log, "a") as f:
            f.write(f"=== soak {time.monotonic() - self.t0:8.1f}s: {text}\n")

    def start(self) -> None:
        self._mark("daemon start")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(self.cfg)],
                                         stdout=log, stderr=log, cwd=ROOT)
        self.lives.append(Life(self.proc.pid, time.monotonic() - self.t0))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ended(self, how: str) -> None:
        self.lives[-1].ended, self.lives[-1].how = time.monotonic() - self.t0, how
        self._mark(f"daemon {self.lives[-1].pid} ended: {how}")
        self.proc = None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._ended("SIGKILL")

    def term(self, timeout: float = 120.0) -> int | None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = self.proc.wait(timeout=timeout)
            self._ended(f"SIGTERM rc={rc}")
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            rc = None
            self._ended(f"SIGTERM ignored for {timeout:.0f}s, then SIGKILL")
        return rc

    def died(self) -> int | None:
        """The exit code if the daemon ended without being told to; None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        self._ended(f"exited by itself rc={rc}")
        return rc

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def total(m: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


@dataclass
class Sample:
    t: float
    pid: int
    rss_kb: int
    events: float | None  # counters of this PID's /metrics (they restart with the daemon)
    ch_rows: float | None
    mqtt_rows: float | None


class Sampler(threading.Thread):
    def __init__(self, daemon: Daemon, port: int, t0: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.d, self.port, self.t0 = daemon, port, t0
        self.samples: list[Sample] = []
        self.halt = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            proc = self.d.proc
            if proc is not None and proc.poll() is None:
                rss = rss_kb(proc.pid)
                if rss is not None:
                    try:
                        m = metrics(self.port)
                        ev, chr_, mq = (total(m, "syncd_events_total"),
                                        total(m, "syncd_sink_rows_total", sink="clickhouse"),
                                        total(m, "syncd_sink_rows_total", sink="mqtt"))
                    except (OSError, ValueError):
                        ev = chr_ = mq = None
                    self.samples.append(Sample(time.monotonic() - self.t0, proc.pid, rss, ev, chr_, mq))
            next_at += SAMPLE_S
            self.halt.wait(max(0.0, next_at - time.monotonic()))


def stalls(samples: list[Sample], until: float) -> list[tuple[float, int, float, float]]:
    """Stretches in which a daemon fetched nothing new, longest first: (seconds, pid, from, to).

    The simulators make data all along and a spool takes it in whatever the sinks do, so `syncd_events_total`
    should grow between any two samples; a stretch ends at the sample that shows it grew (or the life's end).
    """
    by_pid: dict[int, list[Sample]] = {}
    for s in samples:
        if s.events is not None and s.t <= until:
            by_pid.setdefault(s.pid, []).append(s)
    out = []
    for pid, ss in by_pid.items():
        since, last = ss[0].t, ss[0].events or 0.0
        for s in ss[1:]:
            if (s.events or 0.0) > last:
                out.append((s.t - since, pid, since, s.t))
                since, last = s.t, s.events or 0.0
        out.append((ss[-1].t - since, pid, since, ss[-1].t))
    return sorted(out, reverse=True)


# -- chaos --------------------------------------------------------------------------------------------

@dataclass
class Chaos:
    rng: random.Random
    t0: float
    daemon: Daemon
    broker: LocalMosquitto
    srv: ClickHouseHttp
    sims: dict[str, VendorSim]
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, kind, detail)
    counts: Counter[str] = field(default_factory=Counter)
    by_vendor: dict[str, Counter[str]] = field(default_factory=lambda: {f"sim {f}": Counter() for f in SIM_FAULTS})
    pending: list[tuple[float, str, Callable[[], None]]] = field(default_factory=list)  # due recoveries
    down: set[str] = field(default_factory=set)  # daemon, broker, clickhouse, error500, slow:<vendor>

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, kind: str, detail: str, count: bool = True) -> None:
        t = self.now()
        self.events.append((t, kind, detail))
        if count:
            self.counts[kind] += 1
        print(f"[{t:7.1f}s] {kind:22} {detail}", flush=True)

    def later(self, delay: float, what: str, fn: Callable[[], None]) -> None:
        self.pending.append((time.monotonic() + delay, what, fn))

    def recover_due(self, everything: bool = False) -> None:
        keep = []
        for at, what, fn in sorted(self.pending, key=lambda p: p[0]):
            if everything or at <= time.monotonic():
                fn()
            else:
                keep.append((at, what, fn))
        self.pending = keep

    # each action: inject now, schedule its own recovery
    def daemon_kill(self) -> None:
        pid = self.daemon.proc.pid if self.daemon.proc else 0
        self.daemon.kill()
        off = self.rng.uniform(0.0, 8.0)
        self.down.add("daemon")
        self.log("daemon SIGKILL", f"pid {pid}, restart in {off:.1f}s")
        self.later(off, "daemon restart", self._daemon_up)

    def _daemon_up(self) -> None:
        self.daemon.start()
        self.down.discard("daemon")
        self.log("recover", f"daemon started, pid {self.daemon.proc.pid if self.daemon.proc else '?'}", count=False)

    def broker_stop(self) -> None:
        self.broker.stop()
        off = self.rng.uniform(5.0, 40.0)
        self.down.add("broker")
        self.log("broker stop", f"for {off:.1f}s")
        self.later(off, "broker start", self._broker_up)

    def _broker_up(self) -> None:
        self.broker.start()
        self.down.discard("broker")
        self.log("recover", "broker started", count=False)

    def clickhouse_down(self) -> None:
        hard = self.rng.random() < 0.4
        off = self.rng.uniform(5.0, 60.0)
        if hard:
            self.srv.kill()
            self.log("clickhouse SIGKILL", f"for {off:.1f}s")
        else:
            rc = self.srv.stop()
            self.log("clickhouse stop", f"for {off:.1f}s (SIGTERM, rc={rc})")
        self.down.add("clickhouse")
        self.later(off, "clickhouse start", self._clickhouse_up)

    def _clickhouse_up(self) -> None:
        try:
            self.srv.start()
        except RuntimeError as err:
            self.log("SOAK ERROR", f"the ClickHouse server did not come back: {err}", count=False)
            raise
        self.down.discard("clickhouse")
        self.log("recover", "clickhouse started", count=False)

    def clickhouse_500(self) -> None:
        self.srv.set_fault("error500")
        off = self.rng.uniform(5.0, 40.0)
        self.down.add("error500")
        self.log("clickhouse error500", f"for {off:.1f}s")
        self.later(off, "clickhouse ok", self._clickhouse_ok)

    def _clickhouse_ok(self) -> None:
        if "clickhouse" in self.down:  # still stopped: it comes back in mode ok anyway
            self.down.discard("error500")
            return
        self.srv.set_fault("ok")
        self.down.discard("error500")
        self.log("recover", "clickhouse fault mode ok", count=False)

    def sim_fault(self) -> None:
        vendor = self.rng.choice(sorted(self.sims))
        fault = self.rng.choice([f for f in SIM_FAULTS if not (f == "slow" and f"slow:{vendor}" in self.down)])
        sim = self.sims[vendor]
        if fault == "storm_429":
            n, ra = self.rng.randint(3, 25), self.rng.choice([None, None, 1, 2, 5])
            sim.faults.update({"storm_429": n, "retry_after": ra})
            detail = f"next {n} requests 429, Retry-After {ra if ra is not None else 'none'}"
        elif fault == "error_5xx":
            n = self.rng.randint(2, 12)
            sim.faults.update({"error_5xx": n})
            detail = f"next {n} requests 500/503"
        elif fault == "truncate":
            n = self.rng.randint(1, 6)
            sim.faults.update({"truncate": n})
            detail = f"next {n} bodies cut in half"
        else:
            s, off = self.rng.uniform(0.2, 2.0), self.rng.uniform(10.0, 40.0)
            sim.faults.update({"slow": s})
            self.down.add(f"slow:{vendor}")
            detail = f"+{s:.2f}s per response for {off:.1f}s"

            def fast() -> None:
                sim.faults.update({"slow": 0.0})
                self.down.discard(f"slow:{vendor}")
                self.log("recover", f"{vendor} fast again", count=False)

            self.later(off, f"{vendor} fast", fast)
        self.log(f"sim {fault}", f"{vendor}: {detail}")
        self.by_vendor[f"sim {fault}"][vendor] += 1

    def step(self) -> None:
        choices: list[tuple[float, Callable[[], None]]] = [(0.30, self.sim_fault)]
        if "daemon" not in self.down:
            choices.append((0.22, self.daemon_kill))
        if "broker" not in self.down:
            choices.append((0.16, self.broker_stop))
        if "clickhouse" not in self.down:
            choices.append((0.16, self.clickhouse_down))
            if "error500" not in self.down:
                choices.append((0.16, self.clickhouse_500))
        weights, actions = zip(*choices, strict=True)
        self.rng.choices(actions, weights=weights)[0]()

    def heal(self) -> None:
        """Every outage ended now, every simulator fault off."""
        self.recover_due(everything=True)
        if self.srv.proc is None or self.srv.proc.poll() is not None:
            self._clickhouse_up()
        self.srv.set_fault("ok")
        self.down.discard("error500")
        for sim in self.sims.values():
            sim.faults.update({k: getattr(type(sim.faults)(), k) for k in sim.faults.__dataclass_fields__})


# -- the end check ---------------------------------------------------------------------------------

def proxus_freeze_point(sim: ProxusSim, t: float) -> float:
    """A freeze instant with no Proxus alert created in the last WRITE_LAG..0 s before it.

    Frozen at F the API shows alerts created up to F; the truth (asked at F + LAG - WRITE) holds those up to
    F - WRITE. An alert inside that gap would be stored but not in the truth: step F past it.
    """
    for _ in range(200):
        ms = int(t * 1000)
        created = [int(a["CreatedOn"].timestamp() * 1000) for a in sim._alerts(ms)]
        if not any(ms - PROXUS_WRITE_MS < c <= ms for c in created):
            return t
        t += PROXUS_WRITE_MS / 1000
    return t


def run_once(cfg: Path, log: Path, timeout: float = 1800.0) -> tuple[int, str]:
    with open(log, "ab") as f:
        f.write(b"=== soak: syncd run --once\n")
        f.flush()
        try:
            r = subprocess.run([sys.executable, "-m", "syncd", "run", "--config", str(cfg), "--once"], stdout=f,
                               stderr=f, cwd=ROOT, timeout=timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = -999
    lines = log.read_text(errors="replace").split("=== soak: syncd run --once\n")[-1].splitlines()
    why = [ln for ln in lines if any(k in ln for k in ('"run.stream_failed"', '"run.source_failed"',
                                                       '"syncd.flush_incomplete"', "Traceback", "Error"))]
    return rc, "\n".join((why or lines)[-15:])


@dataclass
class VendorCheck:
    vendor: str
    truth: int
    stored: int
    count: int  # count() over events FINAL
    uniq: int
    missing: list[Key]
    unexpected: list[Key]
    values: list[Key]  # same key, another value
    snap_missing: list[Key]
    snap_extra: int  # older states of snapshot kinds (expected of a daemon polling all along)
    snap_unexplained: int  # iotopen: extra status rows that are no log point
    uncertain: int = 0  # navixy: rows of messages whose publish failed as the broker went down

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.values or self.snap_missing or self.snap_unexplained)


def check_vendor(vendor: str, truth: dict[Key, tuple[Any, Any]], stored: dict[Key, tuple[Any, Any]],
                 count: int, uniq: int, uncertain: dict[Key, tuple[Any, Any]]) -> VendorCheck:
    snap = SNAPSHOT_KINDS.get(vendor, set())
    hist_t = {k: v for k, v in truth.items() if k[0] not in snap}
    hist_s = {k: v for k, v in stored.items() if k[0] not in snap}
    snap_t = truth.keys() - hist_t.keys()
    snap_s = stored.keys() - hist_s.keys()
    unexpected = sorted(k for k in hist_s.keys() - hist_t.keys() if k not in uncertain)
    values = sorted(k for k in hist_t.keys() & hist_s.keys() if hist_t[k] != hist_s[k])
    extra = snap_s - snap_t
    unexplained = 0
    if vendor == "iotopen":  # every status an IoT Open poll saw was some topic's newest log point then
        unexplained = sum(1 for k in extra if truth.get(("log", *k[1:])) != stored[k])
    return VendorCheck(vendor, len(truth), len(stored), count, uniq, sorted(hist_t.keys() - hist_s.keys()),
                       unexpected, values, sorted(snap_t - snap_s), len(extra), unexplained,
                       len(hist_s.keys() & uncertain.keys()))


# -- main -------------------------------------------------------------------------------------------------

def mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of chaos (default 600)")
    ap.add_argument("--quick", action="store_true", help="a 90 s smoke run (overrides --duration)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the chaos and of the simulators")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (it is also kept on FAIL)")
    args = ap.parse_args()
    duration = 90.0 if args.quick else args.duration
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="syncd-soak-"))
    t0 = time.monotonic()
    print(f"soak: {duration:.0f}s of chaos, seed {args.seed}, work dir {work}", flush=True)

    broker = LocalMosquitto(work / "mosquitto")
    srv = ClickHouseHttp(work / "chserver")
    sub: IdSubscriber | None = None
    daemon: Daemon | None = None
    sampler: Sampler | None = None
    passed = warned = False
    try:
        broker.start()
        srv.start()
        client = srv.client()
        client.command("CREATE DATABASE IF NOT EXISTS syncd")  # syncd cannot create it on a server yet
        client.close()
        sims, clocks = make_sims(args.seed, broker.url)
        by_vendor = {s.vendor: s for s in sims}
        nav = by_vendor["navixy"]
        assert isinstance(nav, SoakNavixy)
        sub = IdSubscriber(broker.port, client_id=f"soak-alerts-{args.seed}")
        with sims_in_thread(sims):
            port = free_port()
            cfg = work / "syncd.toml"
            text = config_toml(sims, str(work / "data")).replace('http = ""', f'http = "127.0.0.1:{port}"')
            text = text.replace('interval = "5s"', 'interval = "3s"')
            text += (f'\n[clickhouse]\ndsn = "{srv.dsn}"\nbatch_age = "500ms"\n'
                     f'\n[mqtt]\nurl = "{broker.url}"\nmax_age = "3650d"\n')
            cfg.write_text(text)
            daemon = Daemon(cfg, work / "daemon.log", t0)
            daemon.start()
            sampler = Sampler(daemon, port, t0)
            sampler.start()
            chaos = Chaos(rng, t0, daemon, broker, srv, by_vendor)
            for s in sims:
                print(f"  {s.vendor:8} {s.url}", flush=True)
            print(f"  broker {broker.url}, clickhouse {srv.base}, daemon pid {daemon.proc.pid if daemon.proc else '?'}"
                  f", /metrics on {port}", flush=True)

            # Navixy publishes from the moment syncd holds its broker session (before it, the broker keeps
            # nothing for syncd: those messages would be lost by design, not by syncd).
            deadline = time.monotonic() + 180
            while '"mqtt_push.subscribed"' not in daemon.log.read_text(errors="replace"):
                if time.monotonic() > deadline or not daemon.running():
                    print("the daemon never subscribed to the Navixy topics:\n" + daemon.log_tail(), flush=True)
                    return 2
                time.sleep(0.5)
            nav.call(nav.start_publishing(NAVIXY_RATE))
            chaos.log("start", f"daemon subscribed; navixy publishing {NAVIXY_RATE:g} messages/s", count=False)

            # -- chaos ----------------------------------------------------------------------------
            start = time.monotonic()
            end = start + duration
            chaos_end = end - t0
            next_event = start + rng.uniform(5.0, 15.0)
            next_report = start + 30.0
            nav_task_died = ""
            while time.monotonic() < end:
                chaos.recover_due()
                if "daemon" not in chaos.down:
                    rc = daemon.died()
                    if rc is not None:
                        chaos.log("DAEMON DIED", f"exit code {rc} without being told; log tail:\n"
                                  + daemon.log_tail(), count=False)
                        chaos.counts["daemon died by itself"] += 1
                        daemon.start()
                task = nav._task
                if not nav_task_died and task is not None and task.done():
                    nav_task_died = repr(task.exception()) if not task.cancelled() else "cancelled"
                    chaos.log("SIM ERROR", f"navixy publisher stopped: {nav_task_died}", count=False)
                if time.monotonic() >= next_event:
                    chaos.step()
                    next_event = time.monotonic() + rng.uniform(4.0, 20.0)
                if time.monotonic() >= next_report:
                    next_report += 30.0
                    if sampler.samples:
                        s = sampler.samples[-1]
                        print(f"[{chaos.now():7.1f}s] {'sample':22} pid {s.pid} rss {mb(s.rss_kb)}, events "
                              f"{s.events}, clickhouse rows {s.ch_rows}, mqtt rows {s.mqtt_rows}; subscriber ids "
                              f"{len(sub.ids)}", flush=True)
                time.sleep(0.2)

            # -- the end ----------------------------------------------------------------------------
            chaos.log("end", "chaos over: every outage ended, faults off", count=False)
            chaos.heal()
            if not daemon.running():
                rc = daemon.died()
                if rc is not None:
                    chaos.counts["daemon died by itself"] += 1
                daemon.start()
            freeze = proxus_freeze_point(by_vendor["proxus"], time.time())  # type: ignore[arg-type]
            for c in clocks.values():
                c.at = freeze
            nav.call(nav.stop_publishing())
            chaos.log("end", f"worlds frozen at {freeze:.3f}, navixy publishing stopped", count=False)
            time.sleep(10.0)  # the daemon takes in what came last
            term_rc = daemon.term()
            sampler.halt.set()
            chaos.log("end", f"daemon SIGTERM: rc {term_rc}", count=False)
            time.sleep(max(0.0, freeze + 15.0 - time.time()))  # every connector's read-up-to bound past the freeze
            once_rcs = []
            rc, why = run_once(cfg, work / "daemon.log")
            once_rcs.append(rc)
            chaos.log("end", f"syncd run --once: rc {rc}", count=False)
            if rc != 0:
                print(f"--once failed (rc {rc}); why:\n{why}\nrunning it once more", flush=True)
                rc, why = run_once(cfg, work / "daemon.log")
                once_rcs.append(rc)
                chaos.log("end", f"syncd run --once again: rc {rc}", count=False)
                if rc != 0:
                    print(f"--once failed again (rc {rc}); why:\n{why}", flush=True)
            sub.wait_quiet(quiet=3.0, timeout=120.0)

        # -- the check (simulators stopped; their worlds are frozen) ----------------------------------
        clocks["proxus"].at = freeze + (PROXUS_LAG_MS - PROXUS_WRITE_MS) / 1000  # truth lags the API
        clocks["ioto"].at = freeze + IOTO_LAG
        truths = {v: truth_keys(by_vendor[v]) for v in VENDORS}
        uncertain = nav.uncertain_truth()
        uncertain = {k: v for k, v in uncertain.items() if k not in truths["navixy"]}
        client = srv.client()
        try:
            rows = client.query("SELECT vendor, kind, tenant, device, metric, toUnixTimestamp64Milli(ts), value, text "
                                "FROM syncd.events FINAL").result_rows
            counts = {r[0]: (int(r[1]), int(r[2])) for r in client.query(
                "SELECT vendor, count(), uniqExact(event_id) FROM syncd.events FINAL GROUP BY vendor").result_rows}
            ((final_n, final_uniq, raw_n),) = client.query(
                "SELECT (SELECT count() FROM syncd.events FINAL), (SELECT uniqExact(event_id) FROM syncd.events), "
                "(SELECT count() FROM syncd.events)").result_rows
            ch_ids = {int(r[0]) for r in client.query("SELECT event_id FROM syncd.events FINAL").result_rows}
            dead = client.query("SELECT vendor, stream, reason, count() FROM syncd.dead_letter "
                                "GROUP BY vendor, stream, reason ORDER BY count() DESC").result_rows
        finally:
            client.close()
        stored: dict[str, dict[Key, tuple[Any, Any]]] = {v: {} for v in VENDORS}
        for r in rows:
            stored.setdefault(r[0], {})[(r[1], r[2], r[3], r[4], int(r[5]))] = (r[6], r[7])
        checks = [check_vendor(v, truths[v], stored[v], *counts.get(v, (0, 0)),
                               uncertain if v == "navixy" else {}) for v in VENDORS]
        others = sorted(set(stored) - set(VENDORS))
        with sub.lock:
            seen = set(sub.ids)
            received, bad, connects = sub.received, sub.bad, sub.connects
        mqtt_missing = ch_ids - seen
        dups = int(final_n) - int(final_uniq)
        dead_n = sum(int(r[3]) for r in dead)
        once_ok = rc == 0
        passed = (once_ok and all(c.ok for c in checks) and not others and dups == 0 and not mqtt_missing
                  and not nav_task_died)

        # -- summary -------------------------------------------------------------------------------
        elapsed = time.monotonic() - t0
        out: list[str] = []
        out.append("")
        out.append("=" * 100)
        out.append(f"soak summary: {duration:.0f} s of chaos (seed {args.seed}), {elapsed:.0f} s in all, work dir {work}")
        out.append("injected:")
        for kind, n in sorted(chaos.counts.items()):
            per = chaos.by_vendor.get(kind)
            out.append(f"  {kind:24} {n:4d}" + (f"  ({', '.join(f'{v} {c}' for v, c in sorted(per.items()))})"
                                                 if per else ""))
        out.append(f"  {'total':24} {sum(chaos.counts.values()):4d}")
        out.append(f"daemon lives: {len(daemon.lives)} (SIGTERM at the end: rc {term_rc}); final --once rc "
                   f"{' then '.join(map(str, once_rcs))}")
        out.append(f"{'vendor':8} {'truth':>8} {'stored':>8} {'count':>8} {'uniq':>8} {'missing':>8} {'unexpect':>8} "
                   f"{'values':>7} {'snap-miss':>9} {'snap-old':>8}  ok")
        for c in checks:
            out.append(f"{c.vendor:8} {c.truth:8d} {c.stored:8d} {c.count:8d} {c.uniq:8d} {len(c.missing):8d} "
                       f"{len(c.unexpected):8d} {len(c.values):7d} {len(c.snap_missing):9d} {c.snap_extra:8d}  "
                       f"{'yes' if c.ok else 'NO'}")
        out.append("  (truth/stored: keys (kind, tenant, device, metric, ts); history kinds must match exactly, keys "
                   "and values; snapshot kinds " + ", ".join(f"{v}: {'/'.join(sorted(k))}" for v, k in
                                                             SNAPSHOT_KINDS.items())
                   + " must hold every truth key, snap-old = older states also stored)")
        for c in checks:
            for label, keys in (("missing", c.missing), ("unexpected", c.unexpected), ("other value", c.values),
                                ("snapshot missing", c.snap_missing)):
                if keys:
                    out.append(f"  {c.vendor} {label}: {len(keys)}, e.g. {keys[:3]}")
            if c.snap_unexplained:
                out.append(f"  {c.vendor}: {c.snap_unexplained} older status rows match no log point")
            if c.uncertain:
                out.append(f"  {c.vendor}: {c.uncertain} stored rows of {len(nav.uncertain)} messages whose publish "
                           "failed as the broker went down (the sim never got the PUBACK; stored or not, both fine)")
        if others:
            out.append(f"  rows of unknown vendors: {others}")
        out.append(f"events FINAL: count {final_n}, uniqExact(event_id) {final_uniq}; duplicates after FINAL: {dups}; "
                   f"raw rows before merges {raw_n}")
        out.append(f"MQTT: subscriber got {received} messages ({len(seen)} distinct ids, {bad} unparsable, "
                   f"{connects} connects); ClickHouse ids missing from MQTT: {len(mqtt_missing)}"
                   + (f", e.g. {sorted(mqtt_missing)[:5]}" if mqtt_missing else "")
                   + f"; MQTT ids not in ClickHouse: {len(seen - ch_ids)}")
        out.append(f"navixy: {nav.emit_failures} publish chunks failed (broker down), "
                   f"{sum(len(v) for v in nav._published.values())} messages published"
                   + (f"; PUBLISHER DIED: {nav_task_died}" if nav_task_died else ""))
        out.append(f"dead letters: {dead_n}" + "".join(f"\n  {r[0]}/{r[1]}: {r[3]} x {str(r[2])[:120]}"
                                                      for r in dead[:8]))
        samples = sampler.samples
        if samples:
            up = [s for s in samples if s.events is not None] or samples  # start: once /metrics answers
            peak = max(samples, key=lambda s: s.rss_kb)
            mid = min(samples, key=lambda s: abs(s.t - (up[0].t + samples[-1].t) / 2))

            def at(s: Sample) -> str:
                return f"{mb(s.rss_kb)} (pid {s.pid}, {s.t:.0f}s)"

            out.append(f"RSS ({len(samples)} samples every {SAMPLE_S:.0f}s): start {at(up[0])}, middle {at(mid)}, "
                       f"end {at(samples[-1])}, max {at(peak)}")
            by_pid: dict[int, list[Sample]] = {}
            for s in samples:
                by_pid.setdefault(s.pid, []).append(s)
            longest = max(by_pid.values(), key=lambda ss: ss[-1].t - ss[0].t)
            out.append(f"  longest-lived daemon pid {longest[0].pid}: {longest[-1].t - longest[0].t:.0f}s, RSS first "
                       f"{mb(longest[0].rss_kb)}, max {mb(max(s.rss_kb for s in longest))}, last {mb(longest[-1].rss_kb)}")
            out.append("  per life (pid: RSS max, seconds sampled, last /metrics events/clickhouse rows/mqtt rows):")
            for p, ss in by_pid.items():
                last = next((s for s in reversed(ss) if s.events is not None), None)
                counters = (f"{last.events:.0f}/{last.ch_rows:.0f}/{last.mqtt_rows:.0f}" if last is not None
                            and last.ch_rows is not None and last.mqtt_rows is not None else "-")
                out.append(f"    {p}: {mb(max(s.rss_kb for s in ss))}, {ss[-1].t - ss[0].t:.0f}s, {counters}")
        gaps = stalls(samples, chaos_end)
        long_gaps = [g for g in gaps if g[0] >= STALL_WARN_S]
        warned = bool(long_gaps)
        if gaps:
            g = gaps[0]
            out.append(f"liveness: longest stretch without a newly fetched event {g[0]:.0f}s (pid {g[1]}, "
                       f"{g[2]:.0f}s-{g[3]:.0f}s); {len(long_gaps)} stretches of {STALL_WARN_S:.0f}s or more, "
                       f"{sum(x[0] for x in long_gaps):.0f}s in all"
                       + (" -- WARN: the pollers stood still (see daemon.log for those lives)" if long_gaps else ""))
            for x in long_gaps[:6]:
                out.append(f"  stalled {x[0]:5.0f}s: pid {x[1]}, {x[2]:.0f}s-{x[3]:.0f}s")
        out.append(f"RESULT: {'PASS' if passed else 'FAIL'}")
        print("\n".join(out), flush=True)
        (work / "summary.txt").write_text("\n".join(out) + "\n")
        (work / "events.json").write_text(json.dumps(chaos.events, indent=0))
        (work / "rss.json").write_text(json.dumps([s.__dict__ for s in samples]))
        return 0 if passed else 1
    finally:
        if sampler is not None:
            sampler.halt.set()
        if daemon is not None and daemon.running() and daemon.proc is not None:
            daemon.proc.kill()
            daemon.proc.wait(timeout=30)
        if sub is not None:
            sub.close()
        srv.stop()
        broker.stop()
        if args.keep or not passed or warned:
            print(f"work dir kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
