"""events/s of `syncd run --once` over a simulated IoT Open backlog, beside a minimal fetch+insert script.

Both run in this one process tree, side by side, against the same simulator data; the ratio is what counts.
Usage: python bench/bench_iotopen.py [--points 200000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sim.server import config_toml

MINIMAL = r'''
import sys, time, urllib.request, json
import clickhouse_connect
base, key, dsn, insts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
client = clickhouse_connect.get_client(dsn=dsn)
client.command("CREATE DATABASE IF NOT EXISTS b")
client.command("CREATE TABLE IF NOT EXISTS b.t (inst String, topic String, ts DateTime64(3,'UTC'), value Nullable(Float64)) "
               "ENGINE = MergeTree ORDER BY (inst, topic, ts)")
to = int(time.time()) - 10
n = 0
for inst in insts:
    offset = 0
    while True:
        url = f"{base}/api/v3beta/log/{inst}?from={to - 7*86400}&to={to}&order=asc&limit=10000&offset={offset}"
        body = json.loads(urllib.request.urlopen(urllib.request.Request(url, headers={"X-API-Key": key})).read())
        data = body["data"]
        if data:
            columns = [[inst] * len(data), [d["topic"] for d in data], [int(round(d["timestamp"] * 1000)) for d in data],
                       [d["value"] for d in data]]
            client.insert("b.t", columns, column_names=["inst", "topic", "ts", "value"], column_oriented=True)
        rows = data
        n += len(rows)
        offset += body["count"]
        if body["count"] == 0 or offset >= body["total"]:
            break
client.close()
print(n)
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3, help="alternating syncd/minimal pairs; medians are printed")
    args = parser.parse_args()
    sim = IotOpenSim(seed=7, installations=4, topics_per_installation=10, log_points=args.points, history=5 * 86400)
    t_syncd, t_min, n_min = [], [], 0
    with sims_in_thread([sim]):
        insts = sorted({t.tenant for t in sim.ground_truth() if t.kind == "log"})
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = Path(tmp) / "syncd.toml"
                cfg.write_text(config_toml([sim], f"{tmp}/syncd").replace('interval = "5s"', 'interval = "5s"\nstart = "7d"')
                               .replace('[[sources]]', '[clickhouse]\nbatch_rows = 50000\n\n[[sources]]', 1))
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "syncd", "run", "--config", str(cfg), "--once"],
                                   capture_output=True, text=True)
                t_syncd.append(time.perf_counter() - t0)
                if r.returncode != 0:
                    sys.exit(r.stderr[-2000:])
                t0 = time.perf_counter()
                m = subprocess.run([sys.executable, "-c", MINIMAL, sim.url, sim.api_key, f"chdb://{tmp}/minimal",
                                    ",".join(insts)], capture_output=True, text=True)
                t_min.append(time.perf_counter() - t0)
                if m.returncode != 0:
                    sys.exit(m.stderr[-2000:])
                n_min = int(m.stdout.strip())
    truth_logs = args.points
    ts, tm = statistics.median(t_syncd), statistics.median(t_min)
    ratio = (truth_logs / ts) / (n_min / tm)
    print(f"backlog: {truth_logs} log events over {len(insts)} installations, {args.runs} alternating runs (medians)")
    print(f"syncd run --once : {truth_logs / ts:10.0f} events/s  ({ts:.2f} s whole process: spool, ids, all columns)")
    print(f"minimal script   : {n_min / tm:10.0f} events/s  ({tm:.2f} s whole process: fetch + columnar insert)")
    print(f"throughput ratio syncd/minimal: {ratio:.2f}   target >= 0.60   {'MET' if ratio >= 0.6 else 'MISSED'}")


if __name__ == "__main__":
    main()
