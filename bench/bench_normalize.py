"""Normalization cost per row: a vendor page (already parsed JSON) → guarded spool rows, per connector.

Each connector's own `fetch` runs against a canned client (no network, no simulator: the page is built here once and
served from memory), then the page goes through `guard_page` and into spool rows (`Page.rows()`, or `Event.row()` in
trees before columnar pages). What is timed is what a connector, the guard and the ids cost per row.

    python bench/bench_normalize.py                 # this tree
    python bench/bench_normalize.py --base 0782be0  # also the same pages through REV's code (a git worktree), side by side

Figures are medians of REPEATS runs, µs per row; `after/before` below 1 is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPEATS = 7
NOW = 1_760_000_000.0  # the clock every source is given: pages are dated in the hour before it


class Canned:
    """What a connector's VendorClient answers: one function per path suffix gives the parsed body (or raw bytes)."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes

    async def request(self, method: str, url: str, **kw: Any) -> Any:
        from syncd.http import Response

        path = url.split("?", 1)[0]
        for suffix, answer in self.routes.items():
            if path.endswith(suffix):
                body = answer(kw) if callable(answer) else answer
                if isinstance(body, bytes):
                    return Response(200, {}, body, url)
                return Response(200, {"Content-Type": "application/json"}, b"", url, data=body)
        raise AssertionError(f"no canned answer for {method} {url}")


def _rows(page: Any) -> int:
    from syncd.sources.base import guard_page

    page = guard_page(page)
    rows = page.rows() if hasattr(page, "rows") else [e.row() for e in page.events]
    return len(rows)


async def _iotopen(n: int) -> tuple[Any, Any]:
    from syncd.settings import IotOpenSource as Config
    from syncd.sources.base import Stream
    from syncd.sources.iotopen import IotOpenSource

    data = [{"installation_id": 1, "client_id": 101, "timestamp": NOW - 3000 + i * 0.013,
             "topic": f"obj/dev{i % 40}/sensor/{i % 7}", "value": float(i % 1000) / 10, "msg": ""} for i in range(n)]
    fns = [{"id": 900 + d, "type": "temperature", "meta": {"topic_read": f"obj/dev{d}/sensor/0", "name": f"T{d}",
                                                           "unit": "C"}} for d in range(40)]
    client = Canned({"/installationinfo": [{"id": 1, "name": "plant", "client_id": 101, "organization_id": 5}],
                     "/functionx/1": fns, "/log/1": {"data": data, "total": n, "count": n}})
    src = IotOpenSource(Config(vendor="iotopen", name="lynx", api_key="k", start="1h", page_size=n), client,
                        clock=lambda: NOW)
    await src.discover()
    return src, Stream("log/1", "log", "1")


async def _ixon(n: int) -> tuple[Any, Any]:
    from syncd.settings import IxonSource as Config
    from syncd.sources.base import Stream
    from syncd.sources.ixon import IxonSource

    tags = [{"publicId": f"t{k}", "tagId": k, "slug": f"tag-{k}", "name": f"Tag {k}", "source": {"publicId": "src1"},
             "retentionPolicy": "1y", "variable": {"type": "float", "unit": "bar"}} for k in range(20)]
    per = n // 20

    def data_list(kw: dict[str, Any]) -> dict[str, Any]:
        reqs = kw["json"] if isinstance(kw["json"], list) else [kw["json"]]
        start = NOW * 1000 - 3_000_000
        out = [{"points": [{"time": _iso(start + i * 100), "values": {"v": float(i % 500)}} for i in range(per)]}
               for _ in reqs]
        return {"status": "success", "data": out if len(out) > 1 else out[0]}

    client = Canned({"/api/": {"status": "success", "data": []},
                     "/agents": {"status": "success", "data": [{"publicId": "a1", "name": "A"}]},
                     "/data-tags": {"status": "success", "data": tags}, "/data": data_list})
    src = IxonSource(Config(vendor="ixon", name="ixon", base_url="http://x/api", application_id="a", company_id="c",
                            token="t", start="1h"), client, clock=lambda: NOW)
    await src.discover()
    return src, Stream("telemetry/a1", "telemetry", "c", {"agent": "a1"})


async def _proxus(n: int) -> tuple[Any, Any]:
    from syncd.settings import ProxusSource as Config
    from syncd.sources.base import Stream
    from syncd.sources.proxus import ProxusSource

    start = int(NOW * 1000) - 3_000_000
    lines = [json.dumps({"Time": _ch(start + i * 10), "DeviceId": i % 30, "DeviceName": f"press-{i % 30}",
                         "Key": f"k{i % 9}", "DataType": "Float64", "NumericValue": i / 7, "StringValue": ""})
             for i in range(n)]
    body = ("\n".join(lines) + "\n").encode()

    def execute(kw: dict[str, Any]) -> bytes:
        query = kw["json"]["query"]
        if "count()" in query:
            return b'{"count()":"' + str(n).encode() + b'"}\n'
        return body

    client = Canned({"/Authenticate": b'"a.eyJleHAiOjk5OTk5OTk5OTl9.c"', "/odata/Device": {"value": []},
                     "/Telemetry/execute": execute})
    src = ProxusSource(Config(vendor="proxus", name="proxus", base_url="http://x", username="u", password="p",
                              start="1h", page_size=n + 1), client, clock=lambda: NOW)
    await src.discover()
    return src, Stream("telemetry", "telemetry", "proxus")


def _iso(ms: float) -> str:
    ms = int(ms)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _ch(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"


CASES = {"iotopen log": (_iotopen, 10_000), "ixon telemetry": (_ixon, 20_000), "proxus telemetry": (_proxus, 10_000)}


async def _measure(make: Any, n: int) -> tuple[float, int]:
    samples, rows = [], 0
    for _ in range(REPEATS):
        _clear_caches()  # every repeat parses its page from scratch, as a new page would be
        src, stream = await make(n)
        t = time.perf_counter()
        page = await src.fetch(stream, None)
        rows = _rows(page)
        samples.append((time.perf_counter() - t) / max(rows, 1) * 1e6)
    return statistics.median(samples), rows


def _clear_caches() -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("syncd"):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def inner() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (make, n) in CASES.items():
        try:
            us, rows = asyncio.run(_measure(make, n))
            out[name] = {"us": us, "rows": rows}
        except Exception as err:  # a tree whose connector reads the canned page differently: say so, go on
            out[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a git revision to measure side by side (before)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --base (medians)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(inner()))
        return
    here = Path(__file__).resolve().parent.parent
    before = None
    if not args.base:
        after = _run(here)
    else:  # alternate the two trees round by round, so a change of machine load hits both alike
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "base"
            subprocess.run(["git", "-C", str(here), "worktree", "add", "-q", "--detach", str(tree), args.base], check=True)
            try:
                rounds = [(_run(here), _run(tree)) for _ in range(args.rounds)]
            finally:
                subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(tree)], check=True)
        after, before = _medians([a for a, _ in rounds]), _medians([b for _, b in rounds])
    print(f"{'normalization (µs/row)':<22} {'rows':>7} {'before':>9} {'after':>9} {'after/before':>13}")
    for name in CASES:
        a, b = after[name], (before or {}).get(name, {})
        if "error" in a:
            print(f"{name:<22} error: {a['error']}")
            continue
        bu = f"{b['us']:9.2f}" if "us" in b else f"{'-':>9}"
        ratio = f"{a['us'] / b['us']:13.2f}" if "us" in b else f"{'-':>13}"
        print(f"{name:<22} {a['rows']:7d} {bu} {a['us']:9.2f} {ratio}")
        if "error" in b:
            print(f"  before: {b['error']}")


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CASES:
        good = [r[name] for r in runs if "us" in r[name]]
        out[name] = ({"us": statistics.median(g["us"] for g in good), "rows": good[0]["rows"]} if good
                     else runs[0][name])
    return out


def _run(tree: Path) -> dict[str, Any]:
    """This script's `--inner` in a fresh interpreter importing `syncd` from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--inner"], env=env, check=True, capture_output=True, text=True,
                         cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
