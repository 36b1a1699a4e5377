"""Identity: the source joins every event id and sort key, so two deployments never overwrite each other."""

from __future__ import annotations

import time
from pathlib import Path

from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from tests.helpers import ch, once_twice, truth_keys, write_config


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
