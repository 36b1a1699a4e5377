"""IXON end to end: simulator → `syncd run --once` (subprocess) → embedded ClickHouse."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path
from typing import Any

from syncd.sim.common import sims_in_thread
from syncd.sim.ixon import IxonSim
from tests.helpers import ch, once_twice, stored_keys, syncd, truth_keys, write_config


def config(tmp_path: Path, sim: IxonSim) -> Path:
    cfg = write_config(tmp_path, [sim])
    # the simulator's history reaches a little over 24 h back: start before it
    cfg.write_text(cfg.read_text().replace('interval = "5s"', 'interval = "5s"\nstart = "48h"'))
    return cfg


def test_once_stores_ground_truth_then_adds_nothing(tmp_path: Path) -> None:
    sim = IxonSim(seed=21, agents=3, tags_per_agent=24, points_per_tag=240, alarms=6)
    with sims_in_thread([sim]):
        cfg = config(tmp_path, sim)
        _, _, before = once_twice(cfg)
    truth = truth_keys(sim)
    stored = stored_keys(tmp_path / "data", "ixon")
    alerts = sum(k[0] == "alert" for k in truth)
    assert len(truth) == 3 * 24 * 240 + alerts and alerts >= 3 * 6
    assert stored.keys() == truth.keys()
    sample = random.Random(1).sample(sorted(truth), 400) + [k for k in truth if k[0] == "alert"]
    for key in sample:  # values, texts of `str` tags, alert texts with comments
        assert stored[key] == truth[key], key
    (after, uniq, status), = [ch(tmp_path / "data", "SELECT count() FROM syncd.events",
                                 "SELECT uniqExact(event_id) FROM syncd.events",
                                 "SELECT count() FROM syncd.sync_status FINAL WHERE ok = 1")]
    assert before == after == uniq == [[len(truth)]]
    assert status == [[6]]  # telemetry + alert for 3 agents
    (attrs,) = ch(tmp_path / "data", "SELECT attrs['tagId'], attrs['source'], attrs['postAggr'] FROM syncd.events "
                                     "WHERE kind = 'telemetry' LIMIT 1")
    assert attrs[0][0].isdigit() and len(attrs[0][1]) == 12 and attrs[0][2] == "raw"
    # the second run read only the watermark points again: one DataList POST per 20 tags per agent
    posts = [r for r in sim.requests if r.method == "POST"]
    assert len(posts) == 2 * 3 * 2


class BadRecordsSim(IxonSim):
    """Serves one point with an unparseable `time` and one alarm occurrence with an unparseable `occurredOn`."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        tag = self.tags[0][0]
        self.bad_ms = tag.t(5)
        self.bad_tag = tag.obj
        self.bad_occurrence = ""

    def _data_one(self, r: Any, idx: int | None) -> dict[str, Any]:
        out = super()._data_one(r, idx)
        if r["tags"][0].get("id") == self.bad_tag["tagId"] and r["source"]["publicId"] == self.bad_tag["source"]["publicId"]:
            for p in out["points"]:
                if round(datetime.fromisoformat(p["time"]).timestamp() * 1000) == self.bad_ms:
                    p["time"] = "2025-13-45T99:61:00Z"
        return out

    def _occurrences(self, a: int) -> list[dict[str, Any]]:
        out = super()._occurrences(a)
        if a == 1 and out:
            out[0] = dict(out[0], occurredOn="yesterday, 25 o'clock")
            self.bad_occurrence = out[0]["publicId"]
        return out


def test_malformed_records_become_dead_letters_and_the_run_succeeds(tmp_path: Path) -> None:
    sim = BadRecordsSim(seed=22, agents=2, tags_per_agent=4, points_per_tag=50, alarms=3)
    with sims_in_thread([sim]):
        cfg = config(tmp_path, sim)
        r = syncd("run", "--config", str(cfg), "--once")
        assert r.returncode == 0, r.stderr[-3000:]
    assert '"sync.dead_letters"' in r.stderr
    (dead,) = ch(tmp_path / "data", "SELECT stream, reason, payload FROM syncd.dead_letter ORDER BY stream")
    assert len(dead) == 2, dead
    by_stream = {row[0]: row for row in dead}
    agents = [a["publicId"] for a in sim.agent_objs]
    _, reason, payload = by_stream[f"alert/{agents[1]}"]
    assert reason.startswith("occurredOn:") and sim.bad_occurrence in payload
    _, reason, payload = by_stream[f"telemetry/{agents[0]}"]
    assert reason.startswith("time:") and "2025-13-45T99:61:00Z" in payload and "not an ISO 8601" in reason
    # everything else arrived: the bad point is missing, and the bad occurrence's open and close events
    truth = truth_keys(sim)
    occ = sim._occurrences(1)[0]
    missing = {("telemetry", sim.company_id, agents[0], sim.bad_tag["slug"], sim.bad_ms),
               *(("alert", sim.company_id, agents[1], occ["alarm"]["name"], ts) for ts in (occ["_occ"], occ["_rtn"]))}
    assert missing <= truth.keys()
    assert stored_keys(tmp_path / "data", "ixon").keys() == truth.keys() - missing
