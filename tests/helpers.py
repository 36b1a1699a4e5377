"""Test helpers: run syncd as a subprocess, read the embedded store from another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from syncd.sim.common import VendorSim
from syncd.sim.server import config_toml

Run = subprocess.CompletedProcess[str]

QUERY_SCRIPT = r"""
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
out = []
for sql in json.loads(sys.stdin.read()):
    out.append([list(r) for r in client.query(sql).result_rows])
client.close()
print(json.dumps(out, default=str))
"""


def logged(text: str, event: str, **fields: Any) -> bool:
    """Whether the JSON log `text` (a daemon's stderr) has a line for `event` with these field values."""
    for line in text.splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
            return True
    return False


def write_config(tmp: Path, sims: list[VendorSim], extra: str = "") -> Path:
    data = tmp / "data"
    path = tmp / "syncd.toml"
    path.write_text(config_toml(sims, str(data)) + "\n" + extra)
    path.chmod(0o600)  # it holds the simulators' credentials: only the owner reads it (syncd warns otherwise)
    return path


def syncd(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "syncd", *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def syncd_status(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`syncd status` with room for every column (a table narrower than its cells cuts them with an ellipsis)."""
    return syncd("status", "--config", str(cfg), env={"COLUMNS": "250", **(env or {})})


def popen_syncd(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "syncd", *args], stdout=subprocess.PIPE, stderr=stderr, text=True)


def ch(data_dir: Path, *sql: str) -> list[list[list[Any]]]:
    """Run queries against the embedded store at data_dir/clickhouse in a separate process."""
    dsn = f"chdb://{(data_dir / 'clickhouse').resolve()}"
    r = subprocess.run([sys.executable, "-c", QUERY_SCRIPT, dsn], input=json.dumps(list(sql)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def stored_keys(data_dir: Path, vendor: str) -> dict[tuple[str, str, str, str, int], tuple[Any, Any]]:
    """(kind, tenant, device, metric, ts_ms) → (value, text) over events FINAL."""
    (rows,) = ch(data_dir, "SELECT kind, tenant, device, metric, toUnixTimestamp64Milli(ts), value, text "
                           f"FROM syncd.events FINAL WHERE vendor = '{vendor}'")
    return {(r[0], r[1], r[2], r[3], int(r[4])): (r[5], r[6]) for r in rows}


def truth_keys(sim: VendorSim) -> dict[tuple[str, str, str, str, int], tuple[Any, Any]]:
    return {(t.kind, t.tenant, t.device, t.metric, t.ts_ms): (t.value, t.text) for t in sim.ground_truth()}


def once_twice(cfg: Path) -> tuple[Run, Run, list[list[Any]]]:
    """`syncd run --once` twice, both exiting 0; returns both runs and `count()` of events between the two."""
    data = Path(tomllib.loads(cfg.read_text())["syncd"]["data_dir"])
    first = syncd("run", "--config", str(cfg), "--once")
    assert first.returncode == 0, first.stderr[-3000:]
    (between,) = ch(data, "SELECT count() FROM syncd.events")
    second = syncd("run", "--config", str(cfg), "--once")
    assert second.returncode == 0, second.stderr[-3000:]
    return first, second, between


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most timestamps (sorted) that fall in any `window` seconds: what a rate limit counts."""
    best, j = 0, 0
    for i, now in enumerate(times):
        while times[j] <= now - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def status_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """`syncd status` output as {table: [row as {column: cell}]}, tables named by the first word of their title
    ("streams", "sinks", "sources"); rich box tables, one line per row."""
    tables: dict[str, list[dict[str, str]]] = {}
    title, header = "", None
    for line in text.splitlines():
        if line.startswith("┃"):
            header = [c.strip() for c in line.strip().strip("┃").split("┃")]
            tables[title] = []
        elif line.startswith("│") and header is not None:
            tables[title].append(dict(zip(header, (c.strip() for c in line.strip().strip("│").split("│")), strict=True)))
        elif line.strip() and line.lstrip()[0] not in "┏┡└┗━─╇╭╰┌┃│":
            title, header = line.split(":")[0].split()[0], None
    return tables


def status_row(text: str, table: str, **match: str) -> dict[str, str]:
    """The one row of a `syncd status` table whose cells equal `match` (column names with _ for spaces)."""
    rows = [r for r in status_tables(text).get(table, [])
            if all(r.get(k.replace("_", " ")) == v for k, v in match.items())]
    assert len(rows) == 1, f"{len(rows)} rows of {table} match {match}:\n{text}"
    return rows[0]


async def drain(src: Any, stream: Any, cursor: Any = None) -> tuple[list[Any], list[Any], Any]:
    """One run of a stream through its source: fetch until the source says it is caught up (events, dead, cursor)."""
    events: list[Any] = []
    dead: list[Any] = []
    for _ in range(1000):
        page = await src.fetch(stream, cursor)
        events += page.events
        dead += page.dead
        cursor = page.cursor
        if page.done:
            return events, dead, cursor
    raise AssertionError("the stream never caught up")
