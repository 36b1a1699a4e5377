"""Identity: the source joins every event id and sort key, so two deployments never overwrite each other."""

from __future__ import annotations

import json
import time
from pathlib import Path

from syncd.scheduler import RESUME_OVERLAP_S
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from tests.helpers import ch, once_twice, stored_keys, syncd, truth_keys, write_config


def test_two_deployments_with_the_same_installation_ids_are_both_kept(tmp_path: Path) -> None:
    """Two IoT Open deployments (say, two customers' Lynx servers) generated from the same seed: every
    installation id, topic and timestamp is equal; only the configured source differs."""
    now = time.time()
    prod, lab = (IotOpenSim(seed=51, installations=2, log_points=1500, clock=lambda: now) for _ in range(2))
    assert truth_keys(prod) == truth_keys(lab)  # the very same ids on both
    with sims_in_thread([prod, lab]):
        cfg = write_config(tmp_path, [prod, lab])
        text = cfg.read_text()
        first = text.index('name = "iotopen-sim"')
        cfg.write_text(text[:first] + 'name = "lynx-prod"' + text[first + len('name = "iotopen-sim"'):]
                       .replace('name = "iotopen-sim"', 'name = "lynx-lab"'))
        once_twice(cfg)
    per_source, total = ch(tmp_path / "data",
                           "SELECT source, count(), uniqExact(event_id) FROM syncd.events FINAL GROUP BY source ORDER BY source",
                           "SELECT count(), uniqExact(event_id) FROM syncd.events FINAL")
    n = len(truth_keys(prod))
    assert per_source == [["lynx-lab", n, n], ["lynx-prod", n, n]]
    assert total == [[2 * n, 2 * n]]


def test_with_state_db_lost_a_rerun_resumes_from_the_store_minus_the_overlap(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=52, installations=2, topics_per_installation=4, log_points=4000)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        first = syncd("run", "--config", str(cfg), "--once")
        assert first.returncode == 0, first.stderr[-3000:]
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            (tmp_path / "data" / name).unlink(missing_ok=True)
        second = syncd("run", "--config", str(cfg), "--once")
        assert second.returncode == 0, second.stderr[-3000:]
    truth = truth_keys(sim)
    logs = [k for k in truth if k[0] == "log"]
    expected = 0
    for tenant in {k[1] for k in logs}:
        resume_s = (max(k[4] for k in logs if k[1] == tenant) - int(RESUME_OVERLAP_S * 1000)) // 1000
        expected += sum(1 for k in logs if k[1] == tenant and k[4] // 1000 >= resume_s)
    finished = [json.loads(line) for line in second.stderr.splitlines() if '"sync.finished"' in line]
    reread = sum(f["events"] for f in finished if f["stream"].startswith("log/"))
    resumed = [json.loads(line)["stream"] for line in second.stderr.splitlines() if '"stream.resumed_from_sink"' in line]
    assert sorted(s for s in resumed if s.startswith("log/")) == sorted({f"log/{k[1]}" for k in logs})  # not `start`
    assert reread == expected < len(logs) // 4  # only the overlap hour of each installation was read again
    (stored,) = ch(tmp_path / "data", "SELECT count(), uniqExact(event_id) FROM syncd.events FINAL")
    assert stored == [[len(truth), len(truth)]]
    assert stored_keys(tmp_path / "data", "iotopen").keys() == truth.keys()
