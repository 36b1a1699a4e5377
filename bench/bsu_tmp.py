"""10,000 streams on a 60 s interval: what a `syncd run` daemon costs, each figure beside its target.

A live IoT Open simulator (`syncd sim`, its own process: its CPU is never the daemon's) serves 5,000
installations x 2 topics, about one new value per topic a minute; the daemon syncs both streams of each
(`status`, `log`: 10,000 jobs) into the embedded ClickHouse. After discovery it runs --minutes, then
gets SIGTERM. Measured:
- RSS: VmRSS of the daemon, every second; the max after discovery (the first run) counts.
- job start delay: when APScheduler planned a run vs when its coroutine started. A probe (the daemon is started
  through `python -c PROBE`) wraps APScheduler's `run_coroutine_job` and writes (job, planned, started) per run;
  nothing in syncd is touched. It also counts runs skipped because the stream's previous run still ran.
  Cross-check without the probe: a first run is planned at the stream's phase (`phase_start`), so its delay
  is its start (`sync.finished` time - `duration_s`) minus the last phase time before it.
- run completion: end - start of each run, from the probe (the daemon logs each run at debug; a floor poller on
  asyncio timers has no probe: its `sync.finished` lines, JSON on stderr, tell instead). Events and failed runs:
  the daemon's metrics.
- first-run spread: first run starts per 5 s bucket over the 60 s from the earliest; max bucket / mean bucket.
- CPU per run: utime+stime (/proc/PID/stat) over the steady window (from 70 s after the first run to the stop)
  divided by the runs that finished in it.
The machine may be shared: the load average and the simulator's own CPU are printed with the figures.

Usage: python bench/bench_streams.py [--minutes 3] [--installations 5000] [--interval 60]
       [--profile OUT]   py-spy record --gil (raw, 20 s: Python on CPU) of the daemon in its steady window, to OUT
                         (perturbs the figures)
       [--keep DIR]      keep config, data dir, daemon log and probe file in DIR
       [--daemon floor-apscheduler|floor-asyncio|floor-raw]
                         instead of syncd, bench/floor_poller.py: the same GETs on the same phases and nothing else
                         (with APScheduler jobs, or plain asyncio timers; floor-raw: asyncio timers and a hand-written
                         keep-alive HTTP/1.1 client instead of aiohttp): the floor under CPU per run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from syncd.scheduler import FIRST_RUN_SPREAD_S, phase_start
from syncd.sim.broker import free_port

SOURCE = "iotopen-sim"  # the source name `syncd sim --write-config` gives
TOPICS = 2  # per installation: `status` and `log` streams each read both
POINT_EVERY_S = 60  # about one new value per topic per interval: small data per run
HISTORY_S = 3600
RATE, BURST = 400.0, 200  # requests/s: 10,000 runs/min is ~167/s, discovery reads 5,000 functionx lists
START = "5m"  # a stream with no cursor reads this far back: a first run holds a few values, not a day
DISCOVERY_TIMEOUT_S = 900
STEADY_AFTER_S = 70.0  # past the first runs' minute (and their larger first reads)
BUCKET_S = 5.0
TICK = os.sysconf("SC_CLK_TCK")

# --daemon: floor_poller.py --timers T --http H
FLOORS = {"floor-apscheduler": ("apscheduler", "aiohttp"), "floor-asyncio": ("asyncio", "aiohttp"),
          "floor-raw": ("asyncio", "raw")}
TARGETS = {"rss": 400.0, "delay": 1.0, "duration": 10.0, "spread": 2.0, "cpu": 0.5}

# Runs the daemon exactly as `python -m syncd run --config CFG`, with a probe on APScheduler's coroutine runner:
# one line per run start (S), per run end (E: job, planned, started, ended) and per run skipped because the
# previous one still ran (K).
PROBE = r'''
import atexit, runpy, sys, time, os
if os.environ.get("BENCH_UVLOOP"):
    import uvloop; uvloop.install()
import apscheduler.executors.asyncio as ax
from apscheduler.executors.base import MaxInstancesReachedError
out = open(sys.argv[2], "w", buffering=1 << 20)
atexit.register(out.close)
run_job, submit = ax.run_coroutine_job, ax.AsyncIOExecutor.submit_job
async def probed(job, alias, run_times, logger_name):
    started = time.time()
    out.write(f"S\t{job.id}\t{run_times[-1].timestamp():.6f}\t{started:.6f}\n")
    try:
        return await run_job(job, alias, run_times, logger_name)
    finally:
        out.write(f"E\t{job.id}\t{run_times[-1].timestamp():.6f}\t{started:.6f}\t{time.time():.6f}\n")
def counted(self, job, run_times):
    try:
        return submit(self, job, run_times)
    except MaxInstancesReachedError:
        out.write(f"K\t{job.id}\t{run_times[-1].timestamp():.6f}\t{time.time():.6f}\n")
        raise
ax.run_coroutine_job, ax.AsyncIOExecutor.submit_job = probed, counted
if len(sys.argv) > 3:  # a reference poller instead of syncd (bench/floor_poller.py and its arguments)
    sys.argv = sys.argv[3:]
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    sys.argv = ["syncd", "run", "--config", sys.argv[1]]
    runpy.run_module("syncd", run_name="__main__", alter_sys=True)
'''


@dataclass
class Sample:
    at: float  # wall clock
    rss_mb: float
    anon_mb: float
    cpu_s: float  # daemon utime + stime
    sim_cpu_s: float
    load1: float


@dataclass
class Run:
    job: str  # "source:stream", the scheduler's job id
    end: float  # wall clock of its end (probe), or of its sync.finished line
    duration: float
    ok: bool
    events: int

    @property
    def start(self) -> float:
        return self.end - self.duration


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15 of stat)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) in MB; the rest is mostly file pages (libchdb's code)."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                found[key] = int(rest.split()[0]) / 1024
    return found["VmRSS"], found["RssAnon"]


def thread_cpu(pid: int) -> dict[int, tuple[str, float, float]]:
    """tid -> (name, utime s, stime s). Python 3.11 leaves its own threads named after the process; the main
    thread (tid == pid) runs the event loop, the others are the spool's and executors' threads; the embedded
    ClickHouse names its pools."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError, ValueError):
            name, _, rest = task.joinpath("stat").read_text().partition(" (")[2].rpartition(")")
            fields = rest.split()
            out[int(task.name)] = (name, int(fields[11]) / TICK, int(fields[12]) / TICK)
    return out


def thread_shares(pid: int, a: dict[int, tuple[str, float, float]], b: dict[int, tuple[str, float, float]]
                  ) -> list[tuple[str, float, float]]:
    """CPU between two `thread_cpu` snapshots by thread group: (group, utime s, stime s), biggest first."""
    groups: dict[str, list[float]] = {}
    for tid, (name, user, system) in b.items():
        _, user0, system0 = a.get(tid, (name, 0.0, 0.0))
        group = ("event loop (main thread)" if tid == pid else
                 "other Python threads" if name == b[pid][0] else re.sub(r"[0-9]+$", "", name) or "?")
        acc = groups.setdefault(group, [0.0, 0.0])
        acc[0] += user - user0
        acc[1] += system - system0
    return sorted(((g, u, s) for g, (u, s) in groups.items()), key=lambda x: -(x[1] + x[2]))


def load1() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def start_sim(args: argparse.Namespace, cfg: Path, log: Path) -> subprocess.Popen[str]:
    options = {"installations": args.installations, "topics_per_installation": TOPICS, "history": float(HISTORY_S),
               "log_points": args.installations * TOPICS * (HISTORY_S // POINT_EVERY_S)}
    cmd = [sys.executable, "-m", "syncd", "sim", "--vendors", "iotopen", "--live", "--write-config", str(cfg)]
    for key, value in options.items():
        cmd += ["--option", f"iotopen.{key}={value}"]
    sim = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    assert sim.stdout is not None
    for line in sim.stdout:  # "iotopen  http://...", then "config written to ..."
        if line.startswith("config written"):
            return sim
    sys.exit(f"simulator ended early: {log.read_text()[-2000:]}")


def daemon_config(sim_cfg: str, data_dir: Path, http: str, interval: float) -> str:
    text = sim_cfg.replace('data_dir = "./data"', f'data_dir = "{data_dir}"')
    text = text.replace('http = ""', f'http = "{http}"\nlog_format = "json"')
    return text.replace('interval = "5s"', f'interval = "{interval:g}s"\nstart = "{START}"\nrate = {RATE}\nburst = {BURST}')


def finished_runs(log: Path, probe: Path) -> list[Run]:
    """Every run: the probe's end lines (APScheduler), else the `sync.finished` lines (a floor on asyncio timers)."""
    runs = []
    for line in probe.read_text().splitlines() if probe.exists() else []:
        kind, job, _, started, *ended = line.split("\t")
        if kind == "E" and not job.startswith("discover:") and job != "progress":
            runs.append(Run(job, float(ended[0]), float(ended[0]) - float(started), True, 0))
    if runs:
        return runs
    with log.open() as f:
        for line in f:
            if '"sync.finished"' not in line:
                continue
            rec = json.loads(line)
            end = datetime.fromisoformat(rec["timestamp"]).timestamp()
            runs.append(Run(f"{rec['source']}:{rec['stream']}", end, float(rec["duration_s"]), bool(rec["ok"]),
                            int(rec["events"])))
    return runs


def probe_lines(path: Path) -> tuple[list[tuple[str, float, float]], int]:
    """(job, planned, started) of every stream run the probe saw start, and how many runs were skipped."""
    starts, skipped = [], 0
    for line in path.read_text().splitlines():
        kind, job, planned, started, *_ = line.split("\t")
        if job.startswith("discover:") or job == "progress" or kind == "E":
            continue
        if kind == "S":
            starts.append((job, float(planned), float(started)))
        else:
            skipped += 1
    return starts, skipped


def metric_total(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait_first_run(log: Path, daemon: subprocess.Popen[bytes], sample: Callable[[], None]) -> float:
    """Sample while the daemon discovers; returns the wall time of the first sync.finished."""
    deadline, seen = time.time() + DISCOVERY_TIMEOUT_S, 0
    while time.time() < deadline:
        if daemon.poll() is not None:
            sys.exit(f"daemon ended during discovery: {log.read_text()[-2000:]}")
        with log.open() as f:
            f.seek(seen)
            chunk = f.read()
        seen += len(chunk.encode())
        if '"sync.finished"' in chunk:
            return time.time()
        sample()
        time.sleep(1.0)
    sys.exit(f"no run within {DISCOVERY_TIMEOUT_S} s of start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the daemon runs after discovery")
    parser.add_argument("--installations", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--profile", default="", help="py-spy raw output file (20 s, --gil, in the steady window)")
    parser.add_argument("--keep", default="")
    parser.add_argument("--store", choices=("embedded", "server"), default="embedded",
                        help="embedded: chdb in the daemon (the default target); server: a ClickHouse HTTP server in "
                             "its own process (tests/chhttp.py, on the embedded engine), as a plant running 10,000 "
                             "streams would have")
    parser.add_argument("--daemon", choices=("syncd", *FLOORS), default="syncd",
                        help="syncd, or a reference poller doing only the runs' requests (bench/floor_poller.py) with "
                             "APScheduler jobs or plain asyncio timers (floor-raw: and a hand-written HTTP client): the floor under "
                             "CPU per run")
    args = parser.parse_args()

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_streams."))
    tmp.mkdir(parents=True, exist_ok=True)
    cfg, log, probe = tmp / "syncd.toml", tmp / "daemon.log", tmp / "probe.tsv"
    t0 = time.perf_counter()
    sim = start_sim(args, tmp / "sim.toml", tmp / "sim.log")
    sim_ready_s = time.perf_counter() - t0
    port = free_port()
    server = None
    text = daemon_config((tmp / "sim.toml").read_text(), tmp / "data", f"127.0.0.1:{port}", args.interval)
    if args.store == "server":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.chhttp import ClickHouseHttp

        server = ClickHouseHttp(tmp / "server").start()
        text = f'[clickhouse]\ndsn = "{server.dsn}"\n\n' + text
    cfg.write_text(text)
    cfg.chmod(0o600)  # it holds the simulator's key
    floor = [str(Path(__file__).with_name("floor_poller.py")), str(tmp / "sim.toml"), f"{args.interval:g}",
             "--timers", FLOORS[args.daemon][0], "--http", FLOORS[args.daemon][1]] if args.daemon in FLOORS else []
    daemon = subprocess.Popen([sys.executable, "-c", PROBE, str(cfg), str(probe), *floor], stdout=subprocess.DEVNULL,
                              stderr=log.open("w"))
    started = time.time()
    samples: list[Sample] = []

    def sample() -> None:
        samples.append(Sample(time.time(), *rss_mb(daemon.pid), cpu_s(daemon.pid), cpu_s(sim.pid), load1()))

    profiler = None
    metrics = ""
    threads: list[tuple[float, dict[int, tuple[str, float, float]]]] = []  # at the steady window's start and end
    try:
        first = wait_first_run(log, daemon, sample)
        stop_at = first + args.minutes * 60
        profile_at = first + STEADY_AFTER_S
        while time.time() < stop_at:
            if daemon.poll() is not None:
                sys.exit(f"daemon ended: {log.read_text()[-2000:]}")
            sample()
            if not threads and time.time() >= first + STEADY_AFTER_S:
                threads.append((time.time(), thread_cpu(daemon.pid)))
            if args.profile and profiler is None and time.time() >= profile_at:
                profiler = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "-r", "500", "-d", "20", "-p",
                                             str(daemon.pid), "-f", "raw", "-o", args.profile],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(max(0.0, 1.0 - (time.time() - samples[-1].at)))
        sample()
        threads.append((time.time(), thread_cpu(daemon.pid)))
        stopped = time.time()
        with suppress(OSError):
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        if profiler is not None:
            profiler.wait(timeout=60)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=180)
        except subprocess.TimeoutExpired:
            daemon.kill()
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
        if server is not None:
            server.stop()

    report(args, samples, finished_runs(log, probe), probe, metrics, started, stopped, sim_ready_s)
    if len(threads) == 2:
        (a_at, a), (b_at, b) = threads
        print(f"daemon CPU by thread over the last {b_at - a_at:.0f} s, % of a core (user + system):")
        for group, user, system in thread_shares(daemon.pid, a, b)[:8]:
            span = b_at - a_at
            print(f"  {group:28} {100 * (user + system) / span:5.1f}%  ({100 * user / span:.1f} + {100 * system / span:.1f})")
    if args.keep:
        with (tmp / "samples.tsv").open("w") as f:
            f.write("at\trss_mb\tanon_mb\tcpu_s\tsim_cpu_s\tload1\n")
            for s in samples:
                f.write(f"{s.at:.3f}\t{s.rss_mb:.1f}\t{s.anon_mb:.1f}\t{s.cpu_s:.2f}\t{s.sim_cpu_s:.2f}\t{s.load1}\n")
        print(f"kept in {tmp} (samples.tsv: one line per second)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def verdict(value: float, target: float, strict: bool = True) -> str:
    ok = value < target if strict else value <= target
    return f"{'ok  ' if ok else 'MISS'} (target {'<' if strict else '<='} {target:g})"


def report(args: argparse.Namespace, samples: list[Sample], all_runs: list[Run], probe: Path, metrics: str,
           started: float, stopped: float, sim_ready_s: float) -> None:
    runs = [r for r in all_runs if r.end <= stopped]  # runs cut by the shutdown are not the steady state
    if not runs:
        sys.exit("no runs")
    first_run = min(r.start for r in runs)
    streams = args.installations * 2

    after = [s for s in samples if s.at >= first_run]
    peak = max(after, key=lambda s: s.rss_mb)
    rss_max = peak.rss_mb
    rss_discovery = max((s.rss_mb for s in samples if s.at < first_run), default=float("nan"))

    starts, skipped = probe_lines(probe)
    delays = [st - planned for _, planned, st in starts if st <= stopped]
    firsts: dict[str, Run] = {}
    for r in sorted(runs, key=lambda r: r.start):
        firsts.setdefault(r.job, r)
    # a first run is planned at the last time at its phase before it started (phase_start is stable mod spread);
    # the 0.5 s lets a start read from the log a hair before its plan count as on time, not a spread late
    spread = min(args.interval, FIRST_RUN_SPREAD_S)
    first_delays = [r.start - phase_start(r.job, args.interval, r.start - spread + 0.5) for r in firsts.values()]

    durations = [r.duration for r in runs]
    steady_from = first_run + STEADY_AFTER_S
    steady_durations = [r.duration for r in runs if r.end >= steady_from]

    first_starts = sorted(r.start for r in firsts.values())
    t0 = first_starts[0]
    buckets = [0] * int(spread / BUCKET_S)
    for s in first_starts:
        k = int((s - t0) // BUCKET_S)
        if k < len(buckets):
            buckets[k] += 1
    mean_bucket = sum(buckets) / len(buckets)

    window = [s for s in samples if s.at >= steady_from]
    cpu_per_run = float("nan")
    steady_runs = 0
    if len(window) >= 2:
        a, b = window[0], window[-1]
        steady_runs = sum(1 for r in runs if a.at < r.end <= b.at)
        cpu_per_run = (b.cpu_s - a.cpu_s) / max(1, steady_runs) * 1000
        sim_cpu = (b.sim_cpu_s - a.sim_cpu_s) / (b.at - a.at) * 100
        daemon_cpu = (b.cpu_s - a.cpu_s) / (b.at - a.at) * 100
    loads = [s.load1 for s in samples if s.at >= first_run]

    if args.daemon in FLOORS:  # a reference: only what it costs
        print(f"{args.daemon} (bench/floor_poller.py, the runs' GETs and nothing else): CPU per run "
              f"{cpu_per_run:.3f} ms [{steady_runs} runs in the steady window, {daemon_cpu:.0f}% of a core], "
              f"RSS max {rss_max:.1f} MB, {len(runs)} runs, {sum(not r.ok for r in runs)} failed")
        return
    print(f"streams: {streams} ({args.installations} installations x status+log), interval {args.interval:g} s, "
          f"{'embedded ClickHouse (in the daemon)' if args.store == 'embedded' else 'ClickHouse server (own process)'}; "
          f"ran {(stopped - first_run) / 60:.1f} min after discovery "
          f"(discovery {first_run - started:.0f} s, simulator ready in {sim_ready_s:.0f} s)")
    print(f"runs: {len(runs)} finished, {metric_total(metrics, 'syncd_stream_errors_total'):.0f} failed (metrics), "
          f"{skipped} skipped (previous run still going), {len(firsts)} streams ran at least once; "
          f"events {metric_total(metrics, 'syncd_events_total'):.0f} (metrics)")
    print(f"RSS max after discovery : {rss_max:8.1f} MB   {verdict(rss_max, TARGETS['rss'])}"
          f"   [anonymous {peak.anon_mb:.1f} MB of it; during discovery {rss_discovery:.1f} MB, "
          f"last {samples[-1].rss_mb:.1f} MB]")
    print(f"job start delay p99     : {pct(delays, 99):8.3f} s    {verdict(pct(delays, 99), TARGETS['delay'])}"
          f"   [probe, {len(delays)} runs: p50 {pct(delays, 50):.3f}, max {max(delays, default=float('nan')):.3f}]")
    print(f"  first runs, no probe  : {pct(first_delays, 99):8.3f} s    "
          f"[{len(first_delays)} first runs: start - phase time; p50 {pct(first_delays, 50):.3f}, "
          f"max {max(first_delays):.3f}]")
    print(f"run completion p99      : {pct(durations, 99):8.3f} s    {verdict(pct(durations, 99), TARGETS['duration'])}"
          f"   [p50 {pct(durations, 50):.3f}, max {max(durations):.3f}; steady window p99 "
          f"{pct(steady_durations, 99):.3f}]")
    print(f"first-run spread        : {max(buckets) / mean_bucket:8.2f}      "
          f"{verdict(max(buckets) / mean_bucket, TARGETS['spread'])}   [first runs per {BUCKET_S:g} s: {buckets}]")
    print(f"CPU per stream run      : {cpu_per_run:8.3f} ms   {verdict(cpu_per_run, TARGETS['cpu'], strict=False)}"
          f"   [{steady_runs} runs in the steady window]")
    if len(window) >= 2:
        print(f"steady window: daemon {daemon_cpu:.0f}% of a core, simulator {sim_cpu:.0f}% (not counted above)")
    print(f"load average (1 min) during the run: mean {sum(loads) / len(loads):.2f}, max {max(loads):.2f} "
          f"on {os.cpu_count()} cores (a shared machine: every figure is noisy)")


if __name__ == "__main__":
    main()
