"""The floor under syncd's CPU per stream run: the same requests with nothing of syncd around them.

Polls the IoT Open simulator's `status` and `log` endpoints of every installation on the same 60 s phases as
`syncd run` (APScheduler interval jobs, or with `--timers asyncio` plain `loop.call_at`), one aiohttp GET per
run, the body parsed with orjson and dropped. No spool, no sink, no metrics; one `sync.finished` JSON line per
run on stderr so bench_streams reads it as it reads the daemon's log.

With `--http raw` the GETs go through `RawHttp` below instead of aiohttp: eight keep-alive sockets, a request
line written by hand, Content-Length or chunked bodies and nothing else (no TLS, redirects, cookies, proxies or
compression): what the requests cost with the least Python an HTTP/1.1 client can be, the floor under a lighter
client than aiohttp.

Usage (bench_streams runs it): python bench/floor_poller.py SIM_TOML INTERVAL [--timers apscheduler|asyncio]
       [--http aiohttp|raw]
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
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson

from syncd.scheduler import phase_start

LAG_S = 2  # the log window ends this far before now, as a poller of a propagating store must
LIMIT = 500


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a response is a status, headers, and a Content-Length or chunked body."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        lines = bytes(self.buf[:end]).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if b"content-length" in fields:
            size = int(fields[b"content-length"])
            if len(self.buf) < end + 4 + size:
                return
            body = bytes(self.buf[end + 4:end + 4 + size])
            del self.buf[:end + 4 + size]
        else:  # chunked
            body, at = b"", end + 4
            while True:
                eol = self.buf.find(b"\r\n", at)
                if eol < 0:
                    return
                size = int(self.buf[at:eol].split(b";")[0], 16)
                if len(self.buf) < eol + 2 + size + 2:
                    return
                body += self.buf[eol + 2:eol + 2 + size]
                at = eol + 2 + size + 2
                if size == 0:
                    break
            del self.buf[:at]
        self.waiter.set_result((status, body))
        self.waiter = None


class RawHttp:
    """GETs over keep-alive connections to one plain-HTTP host; the caller's gate bounds how many are open."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "localhost", parts.port or 80
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parts.netloc, "User-Agent": "floor/0.1", **headers}.items())
        self.idle: list[_Conn] = []

    async def get(self, path: str, params: dict[str, Any] | None = None) -> tuple[int, bytes]:
        conn = self.idle.pop() if self.idle else None
        if conn is None or conn.transport is None:
            _, conn = await asyncio.get_running_loop().create_connection(_Conn, self.host, self.port)
        assert conn.transport is not None
        target = f"{path}?{urlencode(params)}" if params else path
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.transport.write(f"GET {target} HTTP/1.1\r\n{self.head}\r\n".encode())
        status, body = await asyncio.wait_for(conn.waiter, 30)
        self.idle.append(conn)
        return status, body


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("interval", type=float)
    parser.add_argument("--timers", choices=("apscheduler", "asyncio"), default="apscheduler")
    parser.add_argument("--http", choices=("aiohttp", "raw"), default="aiohttp")
    args = parser.parse_args()
    src = tomllib.loads(Path(args.config).read_text())["sources"][0]
    base, headers = src["base_url"], {"X-API-Key": src["api_key"], "Accept": "application/json"}
    name = src["name"]
    session = aiohttp.ClientSession(headers={"User-Agent": "floor/0.1"})
    async with session.get(f"{base}/api/v2/installationinfo", params={"assigned": "false"}, headers=headers) as r:
        ids = [str(i["id"]) for i in orjson.loads(await r.read())]
    since: dict[str, int] = {}
    gate = asyncio.Semaphore(8)
    raw = RawHttp(base, headers) if args.http == "raw" else None

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
            if raw is not None:
                status, data = await raw.get(url[len(base):], params)
                body = orjson.loads(data)
            else:
                async with session.get(url, params=params, headers=headers) as resp:
                    status, body = resp.status, orjson.loads(await resp.read())
        events = len(body) if isinstance(body, list) else len(body.get("data") or ())
        sys.stderr.write(orjson.dumps({
            "event": "sync.finished", "timestamp": datetime.now(UTC).isoformat(), "source": name,
            "stream": f"{kind}/{inst}", "duration_s": round(time.monotonic() - started, 4), "ok": status == 200,
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
