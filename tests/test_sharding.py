"""Three `syncd run` replicas (`shard = "i/3"`) split one simulator's streams into one ClickHouse server exactly,
and scaling them to two (`"i/2"`, the third data dir gone) hands every stream over without loss or doubles.

The simulator's clock is frozen per phase, so its ground truth is a fixed set when the stores are compared. While
it is frozen the replicas keep reading windows up to their own now: when it jumps ahead for phase 2, the values
stamped in between show up behind a kept stream's cursor, as after a vendor's propagation stall, and the trailing
re-read (`late_window`, `reconcile_every`) brings them in. A moved stream has no cursor in its new data dir and
resumes from the store's newest event of it minus the overlap (`Syncer._resume_point`), which the test checks
in the simulator's request log.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.exceptions import DatabaseError

from syncd.scheduler import RESUME_OVERLAP_S, in_shard
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from tests.chhttp import ClickHouseHttp
from tests.conftest import free_port
from tests.helpers import popen_syncd, truth_keys, write_config
from tests.mqtt_helpers import wait_for

SOURCE = "iotopen-sim"  # the source name syncd.sim.server.config_toml gives the simulator
INSTALLATIONS = 16  # crc32 puts 7 / 6 / 3 of them in shards 0/3, 1/3, 2/3 and 8 / 8 in 0/2, 1/2
Key = tuple[str, str, str, str, int]


class FrozenClock:
    """The simulator's now, moved only by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Replica:
    index: int
    count: int
    port: int  # its /metrics, /healthz, /readyz (every replica needs its own)
    proc: subprocess.Popen[str]
    log: Path
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count}"

    def read_log(self) -> list[dict[str, Any]]:
        self.lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]
        return self.lines

    def ran(self) -> set[str]:
        """The streams this replica ran (every run ends with one `sync.finished` line naming its stream)."""
        return {e["stream"] for e in self.lines if e.get("event") == "sync.finished" and e.get("source") == SOURCE}

    def resumed(self) -> set[str]:
        return {e["stream"] for e in self.lines if e.get("event") == "stream.resumed_from_sink"}


def _q(srv: ClickHouseHttp, sql: str) -> list[tuple[Any, ...]]:
    client = srv.client()
    try:
        return list(client.query(sql).result_rows)
    finally:
        client.close()


def _counts(srv: ClickHouseHttp) -> tuple[int, int]:
    ((final, uniq),) = _q(srv, "SELECT count(), uniqExact(event_id) FROM syncd.events FINAL")
    return int(final), int(uniq)


def _stored(srv: ClickHouseHttp) -> set[Key]:
    rows = _q(srv, "SELECT kind, tenant, device, metric, toUnixTimestamp64Milli(ts) FROM syncd.events FINAL")
    return {(r[0], r[1], r[2], r[3], int(r[4])) for r in rows}


def _start(root: Path, sim: IotOpenSim, srv: ClickHouseHttp, index: int, count: int) -> Replica:
    """One replica as a StatefulSet pod runs it: its own data dir, instance name, metrics port and shard."""
    root.mkdir(exist_ok=True)
    port = free_port()
    cfg = write_config(root, [sim], f'\n[clickhouse]\ndsn = "{srv.dsn}"\nbatch_age = "200ms"\n')
    text = cfg.read_text().replace('http = ""', f'http = "127.0.0.1:{port}"\ninstance = "syncd-{index}"\n'
                                   f'shard = "{index}/{count}"\nlog_format = "json"')
    # rate: a run per stream per second (and a re-read) is more than the connector's default 10 requests/s
    cfg.write_text(text.replace('interval = "5s"', 'interval = "1s"\npage_size = 500\nrate = 200\n'
                                'late_window = "5m"\nreconcile_every = "1s"'))
    log = root / f"shard-{index}-of-{count}.log"
    with open(log, "w") as err:
        proc = popen_syncd("run", "--config", str(cfg), stderr=err)
    return Replica(index, count, port, proc, log)


def _stop(replicas: list[Replica]) -> None:
    """SIGTERM to every replica, then each must exit 0 within a bound (it flushes its spool first)."""
    for r in replicas:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    for r in replicas:
        try:
            r.proc.wait(timeout=60)
        finally:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait(timeout=10)
        assert r.proc.returncode == 0, f"replica {r.name}: {r.log.read_text()[-3000:]}"


def _converged(srv: ClickHouseHttp, want: int) -> bool:
    try:
        final, uniq = _counts(srv)
    except DatabaseError:  # the replicas have not created the schema yet
        return False
    return final == uniq == want


def _run_until(replicas: list[Replica], done: Any) -> None:
    """Wait (bounded) for `done`, then stop the replicas; on a timeout kill them and show their logs' tails."""
    try:
        wait_for(done, timeout=60, every=0.5)
    except Exception:
        for r in replicas:
            r.proc.kill()
            r.proc.wait(timeout=10)
        tails = "\n".join(f"--- replica {r.name}\n{r.log.read_text()[-1500:]}" for r in replicas)
        raise AssertionError(f"replicas did not converge:\n{tails}") from None
    _stop(replicas)


def _check_phase(label: str, srv: ClickHouseHttp, replicas: list[Replica], expected: set[Key],
                 streams: set[str]) -> dict[str, int]:
    """The union equals the truth, no event twice, every stream owned by exactly the replica its hash names."""
    final, uniq = _counts(srv)
    stored = _stored(srv)
    for r in replicas:
        r.read_log()
    owned = {r.name: r.ran() for r in replicas}
    twice = sorted(s for s in streams if sum(s in mine for mine in owned.values()) > 1)
    figures = {"truth": len(expected), "union": final, "owned twice": len(twice)}
    line = f"{label}: truth {len(expected)}, union {final}, owned twice {len(twice)}"
    print(line, {name: len(mine) for name, mine in owned.items()})
    assert final == uniq == len(expected), f"{line}; uniqExact(event_id) {uniq}"
    assert stored == expected, f"{line}; missing {sorted(expected - stored)[:5]}, extra {sorted(stored - expected)[:5]}"
    assert not twice, f"{line}: {twice}"
    for r in replicas:
        mine = {s for s in streams if in_shard(SOURCE, s.split("/", 1)[1], (r.index, r.count))}
        assert owned[r.name] == mine, f"{line}; replica {r.name} ran {sorted(owned[r.name] ^ mine)} against its hash"
    assert set().union(*owned.values()) == streams, f"{line}; never run: {sorted(streams - set().union(*owned.values()))}"
    # sync_status says the same: each stream's newest row comes from the instance whose shard owns it
    status = dict(_q(srv, f"SELECT stream, instance FROM syncd.sync_status FINAL WHERE source = '{SOURCE}'"))
    assert status == {s: f"syncd-{r.index}" for r in replicas for s in owned[r.name]}, line
    return figures


def test_three_replicas_split_the_streams_and_two_take_them_over(tmp_path: Path, server: ClickHouseHttp) -> None:
    started = time.monotonic()
    clock = FrozenClock(time.time() - 20)
    sim = IotOpenSim(seed=61, clock=clock, live=True, installations=INSTALLATIONS, topics_per_installation=3,
                     log_points=228 * INSTALLATIONS * 3, history=1200)  # a point every 5 s per topic
    tenants = [str(inst["id"]) for inst in sim.insts]
    streams = {f"{kind}/{t}" for t in tenants for kind in ("status", "log")}
    for count in (3, 2):  # the hash gives every replica several streams, in both layouts
        assert all(sum(in_shard(SOURCE, t, (i, count)) for t in tenants) >= 3 for i in range(count))
    with sims_in_thread([sim]):
        # phase 1: three replicas, one server, started together (they race to create the schema, as pods do)
        replicas = [_start(tmp_path / f"replica-{i}", sim, server, i, 3) for i in range(3)]
        truth1 = truth_keys(sim)
        _run_until(replicas, lambda: _converged(server, len(truth1)))
        first = _check_phase("3 replicas", server, replicas, set(truth1), streams)
        newest = {t: max(k[4] for k in truth1 if k[0] == "log" and k[1] == t) for t in tenants}
        owner1 = {s: r.index for r in replicas for s in r.ran()}

        # phase 2: the count goes 3 -> 2; replica 2's data dir is gone (its PVC deleted), the simulator moves on
        shutil.rmtree(tmp_path / "replica-2")
        clock.now = time.time() - 10
        truth2 = truth_keys(sim)
        expected2 = set(truth2) | {k for k in truth1 if k[0] == "status"}  # status rows of both instants stay
        assert len(truth2) > len(truth1)
        seen = len(sim.requests)
        replicas2 = [_start(tmp_path / f"replica-{i}", sim, server, i, 2) for i in range(2)]
        _run_until(replicas2, lambda: _converged(server, len(expected2)))
        second = _check_phase("3 -> 2 replicas", server, replicas2, expected2, streams)
        requests = sim.requests[seen:]

    # every stream whose new owner's data dir has no cursor of it resumed from the store, not from `start`
    moved = {s for r in replicas2 for s in r.ran() if owner1[s] != r.index}
    assert moved == {s for s in streams if not in_shard(SOURCE, s.split("/", 1)[1], (owner1[s], 2))}
    assert {owner1[s] for s in moved} == {0, 1, 2}  # all of replica 2's, and some between the other two
    assert set().union(*(r.resumed() for r in replicas2)) == moved
    for stream in sorted(s for s in moved if s.startswith("log/")):
        tenant = stream.split("/", 1)[1]
        froms = [int(dict(q.query)["from"]) for q in requests if q.path == f"/api/v3beta/log/{tenant}"]
        assert min(froms) == (newest[tenant] - int(RESUME_OVERLAP_S * 1000)) // 1000, stream
    print(f"sharding figures: {first} then {second}; {len(moved)} streams moved, all resumed from the store; "
          f"{time.monotonic() - started:.1f} s")
