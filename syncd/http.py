"""Outbound HTTP: one session, a throttle per vendor credential, retries driven by the error class."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import structlog

from syncd.errors import (
    MalformedResponse,
    RateLimited,
    RequestRejected,
    Transient,
    VendorAuthError,
    VendorConnectionError,
    VendorTimeout,
    VendorUnavailable,
)

log = structlog.get_logger("syncd.http")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """Token bucket with AIMD in time: a 429 halves the rate, each second without one adds back a share of the
    configured rate; `Retry-After` blocks all.

    The increase comes with time, not with successes: at a few requests a second, a step per success climbs
    back over the vendor's limit within seconds and keeps meeting 429s. One decrease per round trip: a 429 to
    a request let through before the last decrease says nothing of the rate since.
    Clock and sleep are injected so tests can prove the limits without waiting.
    """

    DECREASE = 0.5  # the rate is multiplied by this on a 429
    RECOVERY = 0.01  # the share of the configured rate added back per second without a 429 (half to full: 50 s)
    SLACK = 0.005  # seconds of refill a token may be taken early (see `acquire`)

    def __init__(
        self, rate: float, burst: int, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
        min_rate: float | None = None, recovery: float = RECOVERY, slack: float = SLACK,
    ) -> None:
        self.max_rate = self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.min_rate = min_rate if min_rate is not None else max(self.max_rate / 64, 0.05)
        self.step = recovery * self.max_rate  # req/s gained per second since the last decrease
        self.clock, self.sleep, self.slack = clock, sleep, slack
        self.tokens = float(self.burst)
        self.updated = clock()
        self.floor = self.rate  # the rate at the last 429; it climbs from there
        self.recover_from = self.updated  # when the climb from `floor` started
        self.decreased = float("-inf")  # when the rate last decreased
        self.blocked_until = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> float:
        """Wait until one request may be sent; returns when (pass it to `on_rate_limited` if that request gets a 429).

        A token may be taken up to `slack` seconds of refill before it is whole, the debt paid from the next one:
        a timer that fires late (epoll rounds up to whole milliseconds, a busy loop adds more) then costs no
        throughput, which at burst 1 and 50 req/s is 5%. In any T seconds at most burst + rate·T + min(½, rate·slack)
        go out: 1 + 49 + 0.245, so still 50 a second at rate 49, burst 1.
        """
        async with self._lock:
            while True:
                now = self.clock()
                if now < self.blocked_until:
                    await self.sleep(self.blocked_until - now)
                    continue
                self._refill(now)
                early = min(0.5, self.rate * self.slack) + 1e-9  # + float tolerance: a refill may land a hair under
                if self.tokens >= 1.0 - early:
                    self.tokens -= 1.0
                    return now
                await self.sleep(max((1.0 - early - self.tokens) / self.rate, 1e-6))

    def rate_at(self, now: float) -> float:
        """The allowed rate at `now`: the floor plus what the time since the climb started has added back."""
        return min(self.max_rate, self.floor + self.step * max(0.0, now - self.recover_from))

    def _refill(self, now: float) -> None:
        rate = self.rate_at(now)
        # tokens earned since the last refill, at the mean of the rates at both ends (the rate climbs linearly)
        earned = max(0.0, now - self.updated) * (self.rate + rate) / 2
        self.tokens = min(float(self.burst), self.tokens + earned)
        self.rate, self.updated = rate, now

    def on_rate_limited(self, retry_after: float | None, sent: float | None = None) -> None:
        """Multiplicative decrease, unless the refused request went out before the last one (`sent`: what
        `acquire` returned for it); respect the vendor's pause when it gave one."""
        now = self.clock()
        self._refill(now)
        fresh = sent is None or sent > self.decreased
        if fresh:
            self.rate = max(self.min_rate, self.rate * self.DECREASE)
            self.decreased, self.tokens = now, min(self.tokens, 0.0)
        if fresh or retry_after is not None:
            pause = retry_after if retry_after is not None else 1.0 / self.rate
            self.blocked_until = max(self.blocked_until, now + pause)
        self.floor, self.recover_from = self.rate, max(now, self.blocked_until)  # climb again once requests may go


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # transient failures (5xx, timeouts, resets, malformed bodies) per request
    rate_limited_attempts: int = 30  # 429s per request before the run gives up (the bucket already slowed down)
    base: float = 0.5
    cap: float = 30.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with full jitter."""
        return rng.uniform(0, min(self.cap, self.base * 2**attempt))


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    data: Any = None  # the parsed body when the request asked for JSON
    lines: list[bytes] | None = None  # the body line by line when the request asked for lines (NDJSON)

    def json(self) -> Any:
        if self.data is not None:
            return self.data
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as err:
            error = err
        try:  # what JavaScript servers emit and orjson refuses: NaN, Infinity, lone surrogate escapes (a cut emoji)
            return json.loads(self.body)
        except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no text
            raise MalformedResponse(
                f"response from {self.url} is not valid JSON ({error})", status=self.status,
                body=self.body[:200].decode("utf-8", "replace"), url=self.url,
            ) from None


ErrorMapper = Callable[[int, Mapping[str, str], bytes, str], Exception | None]


def default_error(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Exception | None:
    """Map an HTTP status to our error tree (vendors override the auth and message parts)."""
    text = body[:300].decode("utf-8", "replace")
    if status < 400:
        return None
    if status == 429:
        return RateLimited(f"rate limited by {url}", retry_after=retry_after(headers), status=status, body=text, url=url)
    if status == 401:
        return VendorAuthError(f"credential refused ({status}) by {url}", status=status, body=text, url=url)
    if status >= 500 or status == 408:
        return VendorUnavailable(f"vendor error {status} from {url}", status=status, body=text, url=url)
    return RequestRejected(f"request rejected ({status}) by {url}: {text}", status=status, body=text, url=url)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date)."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class VendorClient:
    """Sends one source's requests: throttle, concurrency cap, error mapping, retries with backoff."""

    def __init__(
        self, session: aiohttp.ClientSession, bucket: TokenBucket, *, timeout: float, concurrency: int = 4,
        tls_verify: bool = True, retry: RetryPolicy = RetryPolicy(), map_error: ErrorMapper = default_error,
        sleep: Sleep = asyncio.sleep, seed: int | None = None, name: str = "", max_retry_after: float = 900.0,
    ) -> None:
        self.session, self.bucket, self.name, self.max_retry_after = session, bucket, name, max_retry_after
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.ssl = bool(tls_verify)  # True: default verification; False: off (tls_verify = false)
        self.retry, self.map_error, self.sleep = retry, map_error, sleep
        self.gate = asyncio.Semaphore(concurrency)
        self.rng = random.Random(seed)
        self.requests = 0

    async def request(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None, params: Any = None,
        json: Any = None, data: bytes | str | None = None, expect_json: bool = False, expect_lines: bool = False,
    ) -> Response:
        """Send with retries; with `expect_json` a body that does not parse (truncated) is retried too.

        `expect_lines` reads a successful body line by line as it streams (NDJSON) into `Response.lines`;
        a last line without its newline means the body was cut short, and the request is retried.
        """
        transient = limited = 0
        while True:
            try:
                resp = await self._once(method, url, headers=headers, params=params, json=json, data=data,
                                        lines=expect_lines)
                if expect_json:
                    resp.data = resp.json()
                return resp
            except RateLimited as err:
                limited += 1
                if limited >= self.retry.rate_limited_attempts:
                    raise
                log.info("http.rate_limited", url=_redact(url), retry_after=err.retry_after, rate=self.bucket.rate)
            except Transient as err:
                transient += 1
                if transient >= self.retry.attempts:
                    raise
                delay = self.retry.backoff(transient, self.rng)
                log.info("http.retry", url=_redact(url), error=str(err), attempt=transient, delay=round(delay, 3))
                await self.sleep(delay)

    async def _once(self, method: str, url: str, *, lines: bool = False, **kw: Any) -> Response:
        sent = await self.bucket.acquire()
        body = b""
        got_lines: list[bytes] | None = None
        async with self.gate:
            self.requests += 1
            try:
                data = kw.pop("json")
                if data is not None:
                    kw["data"] = orjson.dumps(data)
                    kw["headers"] = {"Content-Type": "application/json", **(kw.get("headers") or {})}
                async with self.session.request(method, url, timeout=self.timeout, ssl=self.ssl, **kw) as resp:
                    status, headers, final_url = resp.status, resp.headers, str(resp.url)
                    if lines and status < 300:
                        got_lines = [line async for line in resp.content]
                        body = got_lines[0] if got_lines else b""  # enough for the vendor's error mapping
                    else:
                        body = await resp.read()
            except TimeoutError:
                raise VendorTimeout(f"{method} {_redact(url)} timed out", url=url) from None
            except aiohttp.ClientPayloadError as err:
                raise MalformedResponse(f"{method} {_redact(url)}: body cut short ({err})", url=url) from None
            except aiohttp.ClientError as err:
                raise VendorConnectionError(f"{method} {_redact(url)}: {err.__class__.__name__}: {err}", url=url) from None
        if got_lines and not got_lines[-1].endswith(b"\n"):
            raise MalformedResponse(f"{method} {_redact(url)}: body cut mid-line", status=status,
                                    body=got_lines[-1][-200:].decode("utf-8", "replace"), url=url)
        error = self.map_error(status, headers, body, _redact(final_url))
        if error is not None:
            if isinstance(error, RateLimited):
                if error.retry_after is not None and error.retry_after > self.max_retry_after:
                    log.warning("http.retry_after_capped", source=self.name, retry_after=error.retry_after,
                                capped_to=self.max_retry_after, url=_redact(final_url))
                    error.retry_after = self.max_retry_after
                self.bucket.on_rate_limited(error.retry_after, sent)
            raise error
        return Response(status, headers, body, final_url, lines=got_lines)


def _redact(url: str) -> str:
    """Query strings can carry keys (Navixy `?hash=`): never log them."""
    return url.split("?", 1)[0]
