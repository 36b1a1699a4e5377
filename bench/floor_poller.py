"""The floor under syncd's CPU per stream run: the same requests with nothing of syncd around them.

Polls the IoT Open simulator's `status` and `log` endpoints of every installation on the same 60 s phases as
`syncd run` (APScheduler interval jobs, or with `--timers asyncio` plain `loop.call_at`), one aiohttp GET per
run, the body parsed with orjson and dropped. No spool, no sink, no metrics; one `sync.finished` JSON line per
run on stderr so bench_streams reads it as it reads the daemon's log.

Usage (bench_streams runs it): python bench/floor_poller.py SIM_TOML INTERVAL [--timers apscheduler|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from syncd.scheduler import phase_start

LAG_S = 2  # the log window ends this far before now, as a poller of a propagating store must
LIMIT = 500


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("interval", type=float)
    parser.add_argument("--timers", choices=("apscheduler", "asyncio"), default="apscheduler")
    args = parser.parse_args()
    src = tomllib.loads(Path(args.config).read_text())["sources"][0]
    base, headers = src["base_url"], {"X-API-Key": src["api_key"], "Accept": "application/json"}
    name = src["name"]
    session = aiohttp.ClientSession(headers={"User-Agent": "floor/0.1"})
    async with session.get(f"{base}/api/v2/installationinfo", params={"assigned": "false"}, headers=headers) as r:
        ids = [str(i["id"]) for i in orjson.loads(await r.read())]
    since: dict[str, int] = {}
    gate = asyncio.Semaphore(8)

    async def run(kind: str, inst: str) -> None:
        started = time.monotonic()
        async with gate:
            if kind == "status":
                url, params = f"{base}/api/v2/status/{inst}", None
            else:
                to = int(time.time()) - LAG_S
                url = f"{base}/api/v3beta/log/{inst}"
                params = {"from": since.get(inst, to - 300), "to": to, "order": "asc", "limit": LIMIT, "offset": 0}
                since[inst] = to
            async with session.get(url, params=params, headers=headers) as resp:
                body = orjson.loads(await resp.read())
        events = len(body) if isinstance(body, list) else len(body.get("data") or ())
        sys.stderr.write(orjson.dumps({
            "event": "sync.finished", "timestamp": datetime.now(UTC).isoformat(), "source": name,
            "stream": f"{kind}/{inst}", "duration_s": round(time.monotonic() - started, 4), "ok": resp.status == 200,
            "events": events}).decode() + "\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    jobs = [(kind, inst) for inst in ids for kind in ("status", "log")]
    if args.timers == "apscheduler":
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler(timezone="UTC")
        for kind, inst in jobs:
            job_id = f"{name}:{kind}/{inst}"
            first = datetime.fromtimestamp(phase_start(job_id, args.interval, time.time()), tz=UTC)
            scheduler.add_job(run, "interval", args=[kind, inst], seconds=args.interval, id=job_id, max_instances=1,
                              coalesce=True, start_date=first, next_run_time=first, misfire_grace_time=None)
        scheduler.start()
    else:
        tasks: set[asyncio.Task[Any]] = set()

        def fire(kind: str, inst: str, at: float) -> None:
            task = loop.create_task(run(kind, inst))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            loop.call_at(at + args.interval, fire, kind, inst, at + args.interval)

        for kind, inst in jobs:
            at = phase_start(f"{name}:{kind}/{inst}", args.interval, time.time())
            mono = loop.time() + (at - time.time())
            loop.call_at(mono, fire, kind, inst, mono)
    await stop.wait()
    await session.close()


if __name__ == "__main__":
    asyncio.run(main())
