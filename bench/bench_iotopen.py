"""events/s of `syncd run --once` over a simulated IoT Open backlog, beside a minimal fetch+insert script.

Both run in this one process tree, side by side, against the same simulator data; the ratio is what counts.
Usage: python bench/bench_iotopen.py [--points 200000]
"""

from __future__ import annotations

import argparse
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
        rows = [[inst, d["topic"], int(round(d["timestamp"] * 1000)), d["value"]] for d in body["data"]]
        if rows:
            client.insert("b.t", rows, column_names=["inst", "topic", "ts", "value"])
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
    args = parser.parse_args()
    sim = IotOpenSim(seed=7, installations=4, topics_per_installation=10, log_points=args.points, history=5 * 86400)
    with sims_in_thread([sim]), tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "syncd.toml"
        cfg.write_text(config_toml([sim], f"{tmp}/syncd").replace('interval = "5s"', 'interval = "5s"\nstart = "7d"')
                       .replace('[[sources]]', '[clickhouse]\nbatch_rows = 50000\n\n[[sources]]', 1))
        truth_logs = args.points
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "syncd", "run", "--config", str(cfg), "--once"],
                           capture_output=True, text=True)
        t_syncd = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(r.stderr[-2000:])
        insts = sorted({t.tenant for t in sim.ground_truth() if t.kind == "log"})
        t0 = time.perf_counter()
        m = subprocess.run([sys.executable, "-c", MINIMAL, sim.url, sim.api_key, f"chdb://{tmp}/minimal", ",".join(insts)],
                           capture_output=True, text=True)
        t_min = time.perf_counter() - t0
        if m.returncode != 0:
            sys.exit(m.stderr[-2000:])
        n_min = int(m.stdout.strip())
    print(f"backlog: {truth_logs} log events over {len(insts)} installations")
    print(f"syncd run --once : {truth_logs / t_syncd:10.0f} events/s  ({t_syncd:.1f} s, spool + dedup + cursors)")
    print(f"minimal script   : {n_min / t_min:10.0f} events/s  ({t_min:.1f} s, fetch + insert only, {n_min} rows)")
    print(f"ratio syncd/minimal: {(truth_logs / t_syncd) / (n_min / t_min):.2f}")


if __name__ == "__main__":
    main()
