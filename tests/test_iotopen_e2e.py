"""IoT Open end to end: simulator → `syncd run --once` (subprocess) → embedded ClickHouse."""

from __future__ import annotations

import random
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from tests.conftest import free_port
from tests.helpers import (
    ch,
    logged,
    once_twice,
    popen_syncd,
    status_row,
    stored_keys,
    syncd,
    syncd_status,
    truth_keys,
    write_config,
)


def test_once_stores_ground_truth_then_adds_nothing(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=11, installations=3, topics_per_installation=8, log_points=6000)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim], "")
        first, _, before = once_twice(cfg)
    truth = truth_keys(sim)
    stored = stored_keys(tmp_path / "data", "iotopen")
    assert len(stored) == len(truth) == 6000 + 24
    assert stored.keys() == truth.keys()
    for key in random.Random(1).sample(sorted(truth), 300):  # a sample of values, text included
        assert stored[key][0] == truth[key][0] and stored[key][1] == truth[key][1], key
    (after, uniq, status), = [ch(tmp_path / "data", "SELECT count() FROM syncd.events",
                                 "SELECT uniqExact(event_id) FROM syncd.events",
                                 "SELECT count() FROM syncd.sync_status FINAL WHERE ok = 1")]
    assert before == after == [[6024]] and uniq == [[6024]]
    assert status[0][0] == 6  # status + log for 3 installations
    # every event's device is its installation's client id; the FunctionX mapped to its topic is in attrs
    (rows, mapped) = ch(tmp_path / "data", "SELECT count() FROM syncd.events WHERE device = '' OR tenant = '' "
                                           "OR device != attrs['client_id']",
                        "SELECT uniqExact(attrs['function_id']), countIf(attrs['function_id'] = '') "
                        "FROM syncd.events")
    assert rows == [[0]]
    functions = {f["id"] for fns in sim.functions for f in fns}
    unmapped = sum(1 for k in truth if not any(f["meta"]["topic_read"] == k[3] for fns in sim.functions for f in fns))
    assert mapped == [[len(functions) + 1, unmapped]]  # one per FunctionX, and '' for the topics without one
    # one sync.finished line per job run, with counts, pages, duration and cursor
    finished = [line for line in first.stderr.splitlines() if '"sync.finished"' in line]
    assert len(finished) == 6 and all('"pages"' in f and '"cursor"' in f and '"duration_s"' in f for f in finished)


def test_secrets_never_reach_the_logs(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=12, installations=1, log_points=200)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        sim.faults.update({"error_5xx": 2, "storm_429": 1, "retry_after": 1})  # retries log URLs and errors
        r = syncd("run", "--config", str(cfg), "--once")
        assert r.returncode == 0, r.stderr[-2000:]
        # a bad key: the refusal is logged, the key is not
        bad = cfg.read_text().replace(sim.api_key, "wrong-key-0123456789")
        cfg.write_text(bad)
        r2 = syncd("run", "--config", str(cfg), "--once")
    assert r2.returncode == 1
    logs = r.stdout + r.stderr + r2.stdout + r2.stderr
    assert sim.api_key not in logs and "wrong-key-0123456789" not in logs
    assert '"source.failed"' in r2.stderr and r2.stderr.count('"source.failed"') == 1


def test_401_relogs_in_once_with_username_and_password(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=13, installations=2, log_points=500)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        text = cfg.read_text().replace(f'api_key = "{sim.api_key}"',
                                       f'api_key = "{sim.api_key}"\nusername = "{sim.username}"\n'
                                       f'password = "{sim.password}"')
        cfg.write_text(text)
        sim.faults.update({"expired": True})  # the configured key is now refused with 401
        r = syncd("run", "--config", str(cfg), "--once")
        assert r.returncode == 0, r.stderr[-3000:]
        assert '"source.relogin"' in r.stderr
        assert sim.password not in r.stderr
    assert len(stored_keys(tmp_path / "data", "iotopen")) == len(truth_keys(sim))


def test_truncated_and_failing_pages_are_retried_not_lost(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=14, installations=2, log_points=3000)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim], "")
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\npage_size = 500'))
        sim.faults.update({"truncate": 2, "error_5xx": 2})  # 4 in a row: under the 6 attempts
        r = syncd("run", "--config", str(cfg), "--once")
        assert r.returncode == 0, r.stderr[-3000:]
    assert '"http.retry"' in r.stderr
    assert stored_keys(tmp_path / "data", "iotopen").keys() == truth_keys(sim).keys()


def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=15, installations=3, topics_per_installation=10, log_points=80_000)
    rng = random.Random(15)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\npage_size = 500')
                       + '\n[clickhouse]\nbatch_rows = 3000\nbatch_age = "200ms"\n')
        kills = 0
        for _ in range(4):
            proc = popen_syncd("run", "--config", str(cfg), "--once", stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 6.0))  # start-up, paging, inserting: any moment
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
        assert kills >= 1
        final = syncd("run", "--config", str(cfg), "--once")
        assert final.returncode == 0, final.stderr[-3000:]
    truth = truth_keys(sim)
    (counts,) = ch(tmp_path / "data", "SELECT count(), uniqExact(event_id) FROM syncd.events FINAL")
    assert counts == [[len(truth), len(truth)]]
    assert stored_keys(tmp_path / "data", "iotopen").keys() == truth.keys()


def test_sigterm_stops_cleanly_and_flushes(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=16, installations=2, log_points=20_000)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        port = free_port()
        cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\npage_size = 500')
                       .replace('http = ""', f'http = "127.0.0.1:{port}"'))
        proc = popen_syncd("run", "--config", str(cfg))
        deadline = time.monotonic() + 60
        state = tmp_path / "data" / "state.db"
        while time.monotonic() < deadline and not state.exists():
            time.sleep(0.2)
        time.sleep(4)
        busy = syncd("query", "--config", str(cfg), "SELECT count() FROM syncd.events")
        assert busy.returncode == 1 and "in use by another process" in busy.stderr, busy.stderr[-500:]
        assert "Traceback" not in busy.stderr
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'syncd_events_total{kind="log",source="iotopen-sim"}' in metrics
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    assert logged(err, "syncd.stopped", flushed=True)
    # whatever was fetched before the stop is in ClickHouse, and the spool is empty
    (spooled,) = ch(tmp_path / "data", "SELECT count() FROM syncd.events")
    status = syncd_status(cfg)
    sink = status_row(status.stdout, "sinks", sink="clickhouse")
    assert (sink["backlog rows"], sink["backlog bytes"], sink["pages"]) == ("0", "0 B", "0"), status.stdout
    assert spooled[0][0] > 0
