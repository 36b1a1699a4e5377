"""RSS of a `syncd run` daemon while its MQTT broker is down: the backlog belongs on disk, not in memory.

A live IoT Open simulator (in this process) feeds a daemon subprocess at a steady rate; a private Mosquitto
takes its MQTT sink. The daemon's VmRSS (/proc/PID/status) is sampled every --sample seconds: a warm-up
with the broker up, an outage with the broker stopped, then the broker back until the MQTT backlog has
drained (read from the daemon's /metrics). Prints RSS before the outage, max/min/last during it, the
growth, rows waiting for MQTT at the end of the outage, RSS after the drain, and whether RSS stayed within
--tolerance MB of its pre-outage level: the outage's last-quarter median against the warm-up's median, and
its max against the warm-up's max (the embedded ClickHouse alone swings RSS by ~15 MB from one insert or
merge to the next, so a lone sample says little).

Usage: python bench/bench_outage_rss.py [--warmup 60] [--outage 600] [--rate 100]
       [--clickhouse-only]      no [mqtt] section: the same phases, for comparison
       [--control]              the broker stays up through the "outage" phase: the same timeline, no outage
       [--smaps]                also print /proc/PID/smaps_rollup (anonymous / file / shared) and threads by name
       [--tree DIR]             run the daemon from another source tree (e.g. an older commit, `git archive`)
       [--keep DIR]             keep data dir, config, daemon and broker logs in DIR
The daemon inherits this process's environment (e.g. MALLOC_ARENA_MAX=2, PYTHONTRACEMALLOC=1).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

from syncd.sim.broker import LocalMosquitto, free_port
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sim.server import config_toml

INSTALLATIONS, TOPICS = 3, 8  # 24 live topics
HISTORY_S = 180.0  # the simulator's history before the anchor (synced during the warm-up)
_METRIC = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def rss_kb(pid: int) -> tuple[int, int, int]:
    """(VmRSS in kB, RssAnon in kB, threads) of a process; VmRSS also counts file pages (libchdb's code)."""
    rss = anon = threads = -1
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    if rss < 0:
        raise RuntimeError(f"no VmRSS for {pid}")
    return rss, anon, threads


def smaps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def thread_names(pid: int) -> dict[str, int]:
    """Threads by name (digits dropped): the embedded ClickHouse names its pools (ThreadPool, MergeMutate, ...)."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):
            name = re.sub(r"[0-9]+$", "", task.joinpath("comm").read_text().strip()) or "?"
            out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def total(m: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


def mqtt_done(m: dict[str, float]) -> float:
    """Rows the MQTT sink is finished with: published, too old for the bus, refused, or dropped by a full spool."""
    return (total(m, "syncd_sink_rows_total", sink="mqtt") + total(m, "syncd_sink_skipped_rows_total", sink="mqtt")
            + total(m, "syncd_sink_refused_rows_total", sink="mqtt")
            + total(m, "syncd_spool_dropped_rows_total", sink="mqtt"))


def rows_waiting(cfg: Path, tree: str | None, port: int) -> tuple[int, str]:
    """Rows spooled for MQTT right now: from `syncd status` (the spool itself), else from /metrics."""
    r = subprocess.run([sys.executable, "-m", "syncd", "status", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=120, cwd=tree, env=_env(tree))
    found = re.search(r"sink mqtt: (\d+) events waiting", r.stdout)
    if found:
        return int(found.group(1)), "syncd status"
    m = metrics(port)
    return int(total(m, "syncd_events_total") - mqtt_done(m)), "/metrics"


def _env(tree: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Sampler:
    def __init__(self, pid: int, every: float, port: int, mqtt: bool) -> None:
        self.pid, self.every, self.port, self.mqtt = pid, every, port, mqtt
        self.samples: list[tuple[float, str, int, int, int, int]] = []  # (t, phase, rss kB, anon kB, threads, backlog)
        self.t0 = time.monotonic()
        self.next = self.t0

    def run(self, phase: str, seconds: float, until: object = None) -> bool:
        """Sample every `every` s for `seconds` (or until `until()` is true); False if the daemon died."""
        end = time.monotonic() + seconds
        if not self.samples:
            self.t0 = self.next = time.monotonic()
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= self.next:
                self.next += self.every
                try:
                    rss, anon, threads = rss_kb(self.pid)
                except (OSError, RuntimeError):
                    return False
                waiting = -1
                with suppress(OSError):
                    m = metrics(self.port)
                    waiting = int(total(m, "syncd_events_total") - mqtt_done(m)) if self.mqtt else -1
                self.samples.append((now - self.t0, phase, rss, anon, threads, waiting))
                print(f"  {now - self.t0:7.1f}s {phase:8} rss {rss / 1024:7.1f} MB  anon {anon / 1024:7.1f} MB  "
                      f"threads {threads:4d}  "
                      f"mqtt backlog {waiting:7d}", flush=True)
                if until is not None and until():  # type: ignore[operator]
                    return True
            time.sleep(max(0.0, min(self.next, end) - time.monotonic()))
        return True

    def rss(self, phase: str) -> list[int]:
        return [r for _, p, r, _, _, _ in self.samples if p == phase]

    def anon(self, phase: str) -> list[int]:
        return [a for _, p, _, a, _, _ in self.samples if p == phase]

    def threads(self, phase: str) -> list[int]:
        return [t for _, p, _, _, t, _ in self.samples if p == phase]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds with the broker up before the outage")
    ap.add_argument("--outage", type=float, default=600.0, help="seconds with the broker down")
    ap.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for the backlog to drain")
    ap.add_argument("--after", type=float, default=30.0, help="seconds sampled after the drain")
    ap.add_argument("--rate", type=float, default=100.0, help="log points per second the live simulator makes")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--tolerance", type=float, default=10.0, help="MB of RSS growth still counted as flat")
    ap.add_argument("--clickhouse-only", action="store_true", help="no [mqtt]: the same phases without the sink")
    ap.add_argument("--control", action="store_true", help="keep the broker up through the 'outage' (same timeline)")
    ap.add_argument("--smaps", action="store_true", help="print smaps_rollup and threads by name per phase")
    ap.add_argument("--tree", default=None, help="source tree to run the daemon from (default: this one)")
    ap.add_argument("--keep", default=None, help="keep the data dir, config and logs here")
    ap.add_argument("--clickhouse-http", action="store_true",
                    help="ClickHouse over http:// (the production path; the tests' server runs the engine in its own "
                         "process) instead of the embedded engine inside the daemon")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its daemon and broker

    topics = INSTALLATIONS * TOPICS
    period_ms = 1000.0 * topics / args.rate
    log_points = topics * int((HISTORY_S * 1000 - 60_000) // period_ms)
    sim = IotOpenSim(seed=11, live=True, installations=INSTALLATIONS, topics_per_installation=TOPICS,
                     log_points=log_points, history=HISTORY_S)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="syncd-rss-"))
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    broker = LocalMosquitto(work / "mosquitto")
    port = free_port()
    tree = str(Path(args.tree).resolve()) if args.tree else None
    proc: subprocess.Popen[bytes] | None = None
    server = None
    try:
        with sims_in_thread([sim]):
            broker.start()
            if args.clickhouse_http:
                sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' ClickHouse server
                from tests.chhttp import ClickHouseHttp

                server = ClickHouseHttp(work / "chserver").start()
                client = server.client()
                client.command("CREATE DATABASE IF NOT EXISTS syncd")
                client.close()
            cfg = work / "syncd.toml"
            text = config_toml([sim], str(work / "data")).replace('http = ""', f'http = "127.0.0.1:{port}"')
            text = text.replace('interval = "5s"', 'interval = "2s"\nstart = "1h"')
            if not args.clickhouse_only:
                text += f'\n[mqtt]\nurl = "{broker.url}"\n'
            if server is not None:
                text += f'\n[clickhouse]\ndsn = "{server.dsn}"\n'
            cfg.write_text(text)
            log = open(work / "daemon.log", "wb")  # noqa: SIM115 - closed with the daemon
            proc = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(cfg)], stdout=log,
                                    stderr=log, cwd=tree, env=_env(tree))
            print(f"daemon pid {proc.pid}, {topics} live topics at {args.rate:.0f} points/s "
                  f"({'ClickHouse only' if args.clickhouse_only else 'ClickHouse + MQTT'}), work dir {work}", flush=True)
            sampler = Sampler(proc.pid, args.sample, port, mqtt=not args.clickhouse_only)
            deadline = time.monotonic() + 120
            while True:  # up: /metrics answers and the first events went out
                with suppress(OSError):
                    m = metrics(port)
                    if total(m, "syncd_sink_rows_total", sink="clickhouse") > 0 and (
                            args.clickhouse_only or total(m, "syncd_sink_rows_total", sink="mqtt") > 0):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    print((work / "daemon.log").read_text()[-3000:])
                    return 2
                time.sleep(0.5)
            phases: dict[str, dict[str, int]] = {}
            events_at = {"start": total(metrics(port), "syncd_events_total")}
            ok = sampler.run("warmup", args.warmup)
            phases["before"] = smaps(proc.pid)
            names = {"before": thread_names(proc.pid)}
            events_at["outage"] = total(metrics(port), "syncd_events_total")
            if not args.control:
                broker.stop()
            ok = ok and sampler.run("outage", args.outage)
            phases["outage end"] = smaps(proc.pid)
            names["outage end"] = thread_names(proc.pid)
            waiting, waiting_from = (rows_waiting(cfg, tree, port) if not args.clickhouse_only
                                     else (0, "no MQTT sink"))
            m = metrics(port)
            events_at["restart"] = total(m, "syncd_events_total")
            errors = total(m, "syncd_sink_errors_total", sink="mqtt")
            if not args.control:
                broker.start()
            restart = time.monotonic()
            target = events_at["restart"]
            drained = ok and sampler.run("drain", args.drain_timeout,
                                         until=lambda: args.clickhouse_only or mqtt_done(metrics(port)) >= target)
            drain_s = time.monotonic() - restart
            ok = drained and sampler.run("after", args.after)
            phases["after"] = smaps(proc.pid) if proc.poll() is None else {}
            names["after"] = thread_names(proc.pid) if proc.poll() is None else {}
            if not ok:
                print("the daemon died:\n" + (work / "daemon.log").read_text()[-3000:])
                return 2
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    warm, out, drain, after = (sampler.rss(p) for p in ("warmup", "outage", "drain", "after"))
    settled = warm[len(warm) // 2:]  # the second half of the warm-up: past the start-up backlog
    before, before_max = statistics.median(settled), max(settled)
    end = statistics.median(out[-max(1, len(out) // 4):])  # the last quarter of the outage
    mb = 1 / 1024
    elapsed = args.warmup + args.outage
    rate = (events_at["restart"] - events_at["start"]) / elapsed if elapsed else 0.0
    print()
    store = "ClickHouse over http:// (engine in another process)" if args.clickhouse_http else "ClickHouse (embedded chdb)"
    print(f"config: {store + ' only' if args.clickhouse_only else store + ' + MQTT'}, "
          f"{'CONTROL: broker never stopped, ' if args.control else ''}"
          f"live IoT Open at {rate:.0f} events/s, warm-up {args.warmup:.0f} s, outage {args.outage:.0f} s"
          + (f", MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']}" if "MALLOC_ARENA_MAX" in os.environ else "")
          + (f", tree {tree}" if tree else ""))
    print(f"RSS before the outage      : {before * mb:8.1f} MB median, {before_max * mb:.1f} MB max "
          f"(second half of the warm-up, {len(settled)} samples)")
    print(f"RSS during the outage      : max {max(out) * mb:.1f} MB, min {min(out) * mb:.1f} MB, "
          f"last {out[-1] * mb:.1f} MB, median of the last quarter {end * mb:.1f} MB")
    print(f"growth during the outage   : {(end - before) * mb:+8.1f} MB (last-quarter median - before median), "
          f"{(max(out) - before_max) * mb:+.1f} MB (max - max before)")
    print(f"rows waiting for MQTT      : {waiting} at the end of the outage ({waiting_from}); "
          f"{errors:.0f} MQTT write errors during it")
    print(f"backlog drained in         : {drain_s:8.1f} s (RSS max {max(drain) * mb:.1f} MB while draining)")
    print(f"RSS after the drain        : {after[-1] * mb:8.1f} MB last, {statistics.median(after) * mb:.1f} MB median")
    anon = [sampler.anon(p) for p in ("warmup", "outage", "after")]
    a_before, a_end = statistics.median(anon[0][len(anon[0]) // 2:]), statistics.median(anon[1][-max(1, len(anon[1]) // 4):])
    print(f"anonymous RSS (RssAnon)    : {a_before * mb:.1f} MB before, max {max(anon[1]) * mb:.1f} MB during, "
          f"{(a_end - a_before) * mb:+.1f} MB growth (same medians), {anon[2][-1] * mb:.1f} MB after the drain")
    thr = [sampler.threads(p) for p in ("warmup", "outage", "after")]
    print(f"daemon threads             : {thr[0][-1]} before, {max(thr[1])} max during, {thr[2][-1]} after "
          "(most are the embedded ClickHouse's pool; each keeps its stack and allocator cache)")
    # within: the outage's level (last-quarter median) and its peaks (max against the warm-up's max) both
    within = end - before <= args.tolerance * 1024 and max(out) - before_max <= args.tolerance * 1024
    print(f"RSS within {args.tolerance:.0f} MB of before  : {'yes' if within else 'NO'}")
    if args.smaps:
        keys = ("Rss", "Anonymous", "Pss_Anon", "Pss_File", "Pss_Shmem", "Private_Dirty", "Shared_Clean")
        for phase, values in (("before", phases["before"]), ("outage end", phases["outage end"]),
                              ("after", phases["after"])):
            print(f"smaps_rollup {phase:10}: " + ", ".join(f"{k} {values.get(k, 0) * mb:.1f}" for k in keys) + " MB")
        for phase, counts in names.items():
            print(f"threads {phase:10}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
