"""The embedded engine hands its unused code pages back after it opens, and keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
for name in ("pyarrow", "pandas", "numpy"):  # as `syncd` runs (cli.UNUSED_MODULES)
    sys.modules[name] = None
from syncd.sinks import engine_pages
from syncd.sinks.clickhouse import ClickHouseSink

def mapped_mb():
    # RSS of the library's clean read-only mappings (what release() unmaps)
    ranges = {f"{a:x}-{b:x}" for a, b in engine_pages.clean_read_only_ranges("_chdb.abi3")}
    total, mine = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=1)
        if not head[0].endswith(":"):
            mine = head[0] in ranges
        elif mine and head[0] == "Rss:":
            total += int(head[1].split()[0])
    return total >> 10

sink = ClickHouseSink(f"chdb://{sys.argv[1]}", "syncd")
sink.open_sync()  # opens, migrates, releases
client = sink.client
client.query("SELECT count() FROM system.tables")  # pages fault back in as the engine runs
after_queries = mapped_mb()
advised = engine_pages.release()
after_release = mapped_mb()
client.command("CREATE TABLE syncd.t (k UInt64, v Float64) ENGINE = MergeTree ORDER BY k")
client.insert("syncd.t", [[i, i / 2] for i in range(10_000)], column_names=["k", "v"])
print(json.dumps([advised >> 20, after_queries, after_release,
                  client.query("SELECT count(), sum(v) FROM syncd.t").result_rows[0]]))
"""


def test_the_engine_releases_its_library_pages_and_answers_exactly_after(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ch")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    advised_mb, after_queries, after_release, (count, total) = json.loads(r.stdout.splitlines()[-1])
    assert advised_mb >= 400  # the library's clean read-only mappings (code and constants) were all advised
    # unmapped from this process (engine threads may fault a few pages back in meanwhile)
    assert after_release < 32 <= after_queries, (after_queries, after_release)
    assert (count, total) == (10_000, sum(i / 2 for i in range(10_000)))
