"""Start-up: seconds from launching `syncd run --once` to its first request at a vendor, and to its first data fetch.

The IoT Open simulator runs in this process and records when each request arrives; the daemon starts on a fresh data
directory (a new embedded store, which opens while the source discovers). Medians of `--runs` starts.
syncd's bytecode is compiled first, as `pip install` does for an installed package (a shell with
PYTHONDONTWRITEBYTECODE=1 and an editable install would otherwise compile every module on every start).

    python bench/bench_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import syncd
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sim.server import config_toml

TARGET_S = 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    compileall.compile_dir(Path(syncd.__file__).parent, quiet=1)
    sim = IotOpenSim(seed=7, installations=2, topics_per_installation=3, log_points=100, history=3600)
    first_request, first_data, whole = [], [], []
    with sims_in_thread([sim]):
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = Path(tmp) / "syncd.toml"
                cfg.write_text(config_toml([sim], f"{tmp}/syncd"))
                seen = len(sim.requests)
                t0 = time.time()
                proc = subprocess.run([sys.executable, "-m", "syncd", "run", "--config", str(cfg), "--once"],
                                      capture_output=True, text=True)
                whole.append(time.time() - t0)
                if proc.returncode != 0:
                    sys.exit(proc.stderr[-2000:])
                requests = sim.requests[seen:]
                first_request.append(requests[0].at - t0)
                first_data.append(next(r.at for r in requests if "/log/" in r.path or "/status/" in r.path) - t0)
    fr, fd = statistics.median(first_request), statistics.median(first_data)
    print(f"start-up over {args.runs} starts (medians): first vendor request {fr:.3f} s, "
          f"first data fetch {fd:.3f} s, whole --once {statistics.median(whole):.2f} s (bytecode compiled, as installed)")
    print(f"first fetch after start: {fd:.3f} s   target < {TARGET_S} s   {'MET' if fd < TARGET_S else 'MISSED'}")


if __name__ == "__main__":
    main()
