"""What every vendor simulator shares: fault switches, a strict rate limiter, a request log and the runner.

Simulators never import from the connector side (syncd.sources, syncd.events, ...): a
misreading of a brief on one side is then caught by the other.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from aiohttp import web

Clock = Callable[[], float]


@dataclass
class Faults:
    """Switchable failures; counts are "the next N requests", so a test can script an outage."""

    storm_429: int = 0  # next N requests answer 429 (vendor shape)
    retry_after: float | None = None  # Retry-After seconds sent with injected 429s (None: header left out)
    error_5xx: int = 0  # next N requests answer 500/503
    truncate: int = 0  # next N successful bodies are cut in half
    slow: float = 0.0  # seconds added to every response
    expired: bool = False  # every credential is treated as expired / revoked

    def update(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key not in self.__dataclass_fields__:
                raise KeyError(key)
            setattr(self, key, value)


@dataclass(frozen=True)
class TruthRow:
    """One record as the vendor holds it, in the terms of DESIGN.md "The event" (ts in epoch ms, UTC)."""

    vendor: str
    kind: str
    tenant: str
    device: str
    metric: str
    ts_ms: int
    value: float | None
    text: str | None


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    at: float


class SlidingWindowLimit:
    """At most `limit` requests in any `window` seconds (the sim's model of a vendor limit)."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self.hits: deque[float] = deque()

    def allow(self) -> bool:
        now = self.clock()
        while self.hits and self.hits[0] <= now - self.window:
            self.hits.popleft()
        if len(self.hits) >= self.limit:
            return False
        self.hits.append(now)
        return True


class VendorSim:
    """Base of one fake vendor cloud. Subclasses add routes and render errors in their vendor's shape."""

    vendor: ClassVar[str] = ""

    def __init__(self, seed: int = 1, *, clock: Clock = time.time) -> None:
        self.seed = seed
        self.clock = clock
        self.rng = random.Random(seed)
        self.faults = Faults()
        self.requests: list[RecordedRequest] = []
        self.limits: list[SlidingWindowLimit] = []  # checked in order on every vendor request
        self.url = ""  # set by the runner once bound

    # -- subclass hooks -------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        """An error response exactly as this vendor shapes it (used by faults and limits)."""
        raise NotImplementedError

    def ground_truth(self) -> list[TruthRow]:
        """Every record a complete sync must store (kinds the connector pulls by default)."""
        raise NotImplementedError

    def source_config(self) -> dict[str, Any]:
        """The `[[sources]]` entry (minus `name`) that points syncd at this simulator."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/_sim/truth", self._h_truth)
        app.router.add_post("/_sim/faults", self._h_faults)
        app.router.add_get("/_sim/faults", self._h_faults)
        app.router.add_get("/_sim/requests", self._h_requests)
        self.add_routes(app)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        body = await request.read()
        self.requests.append(
            RecordedRequest(request.method, request.path, list(request.query.items()), dict(request.headers), body, self.clock())
        )
        f = self.faults
        if f.slow:
            await asyncio.sleep(f.slow)
        for limit in self.limits:
            if not limit.allow():
                return self.error(429, "Too Many Requests")
        if f.storm_429 > 0:
            f.storm_429 -= 1
            headers = {"Retry-After": _fmt_seconds(f.retry_after)} if f.retry_after is not None else None
            return self.error(429, "Too Many Requests", headers)
        if f.error_5xx > 0:
            f.error_5xx -= 1
            return self.error(503 if f.error_5xx % 2 else 500, "Internal Server Error")
        response = await handler(request)
        if f.truncate > 0 and isinstance(response, web.Response) and response.body and response.status < 300:
            f.truncate -= 1
            raw = bytes(response.body)  # type: ignore[arg-type]
            cut = web.Response(body=raw[: len(raw) // 2], status=response.status, content_type=response.content_type)
            return cut
        return response

    async def _h_truth(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(r) for r in self.ground_truth()])

    async def _h_faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.faults.update(await request.json())
            except (KeyError, ValueError) as err:
                return web.json_response({"error": f"bad fault switch: {err}"}, status=400)
        return web.json_response(asdict(self.faults))

    async def _h_requests(self, request: web.Request) -> web.Response:
        out = [
            {"method": r.method, "path": r.path, "query": r.query, "body": r.body.decode("utf-8", "replace")}
            for r in self.requests
        ]
        return web.json_response(out)


def _fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


async def start_sims(sims: list[VendorSim], host: str = "127.0.0.1", ports: list[int] | None = None) -> list[web.AppRunner]:
    """Serve each simulator on its own port (0 = free port) and set its `url`."""
    runners = []
    for i, sim in enumerate(sims):
        runner = web.AppRunner(sim.make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, (ports[i] if ports else 0))
        await site.start()
        port = runner.addresses[-1][1]  # the port the OS picked (public: the runner's bound addresses)
        sim.url = f"http://{host}:{port}"
        runners.append(runner)
    return runners


@contextmanager
def sims_in_thread(sims: list[VendorSim], host: str = "127.0.0.1") -> Iterator[list[VendorSim]]:
    """Run simulators on a private event loop in a thread (for synchronous tests and benches)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runners: list[web.AppRunner] = []
    errors: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            runners.extend(loop.run_until_complete(start_sims(sims, host)))
        except BaseException as err:  # surfaced to the caller below
            errors.append(err)
        ready.set()
        if not errors:
            loop.run_forever()

    thread = threading.Thread(target=main, name="syncd-sim", daemon=True)
    thread.start()
    ready.wait()
    if errors:
        raise errors[0]
    try:
        yield sims
    finally:
        async def stop() -> None:
            for r in runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# -- poison: records whose bad values go over the wire verbatim ---------------------------------------------

@dataclass(frozen=True)
class Poisoned:
    """A generated record a simulator served with a bad value instead of its own (option `poison`).

    `key` is the record's (kind, tenant, device, metric, ts_ms) in ground-truth terms (a record served in two
    lists, such as a latest value in the log and the status list, is listed once per list); `field` is what the
    dead letter's reason must name, or None when the record is still stored (a NaN reading: value NULL).
    """

    variant: str
    key: tuple[str, str, str, str, int]
    field: str | None
    raw: str  # the JSON text sent in place of the good value


def raw_json(text: str) -> str:
    """A placeholder that `splice_raw` replaces by `text` verbatim: a NaN literal, a lone surrogate escape."""
    return f"\x00raw:{text}\x00"


_RAW = re.compile(r'"\\u0000raw:((?:[^"\\]|\\.)*?)\\u0000"')


def splice_raw(body: str) -> str:
    """A JSON text with every `raw_json` placeholder (a string, `\\u0000`-escaped) replaced by its raw text."""
    if "\\u0000raw:" not in body:
        return body
    return _RAW.sub(lambda m: json.loads(f'"{m.group(1)}"'), body)


def poison_list(value: str | list[str] | tuple[str, ...], known: dict[str, Any], vendor: str) -> list[str]:
    """The `poison` option (comma-separated or a list) checked against the variants a simulator knows."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{vendor} sim: unknown poison {unknown}; known: {sorted(known)}")
    return list(dict.fromkeys(names))


__all__ = ["Clock", "Faults", "TruthRow", "RecordedRequest", "SlidingWindowLimit", "VendorSim", "start_sims", "sims_in_thread", "dumps",
           "Poisoned", "raw_json", "splice_raw", "poison_list"]
