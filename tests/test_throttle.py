"""The throttle with an injected clock: rate + burst is never exceeded; Retry-After silences the source."""

from __future__ import annotations

import aiohttp
import pytest

from syncd.errors import RateLimited
from syncd.http import RetryPolicy, TokenBucket, VendorClient
from syncd.sim.common import start_sims
from syncd.sim.iotopen import IotOpenSim
from tests.helpers import max_in_window


class FakeTime:
    """A clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)



@pytest.mark.parametrize(("rate", "burst"), [(10.0, 20), (2.0, 1), (50.0, 5)])
async def test_bucket_never_exceeds_rate_plus_burst(rate: float, burst: int) -> None:
    t = FakeTime()
    bucket = TokenBucket(rate, burst, clock=t.clock, sleep=t.sleep)
    sent = []
    for _ in range(int(rate * 10) + burst):
        await bucket.acquire()
        sent.append(t.now)
    assert max_in_window(sent) <= rate + burst
    # Over the whole run the average rate is the configured one (the burst only front-loads).
    assert len(sent) <= rate * (sent[-1] - sent[0]) + burst + 1


async def test_retry_after_pauses_every_request_for_n_seconds() -> None:
    t = FakeTime()
    bucket = TokenBucket(10, 20, clock=t.clock, sleep=t.sleep)
    await bucket.acquire()
    hit = t.now
    bucket.on_rate_limited(retry_after=7)
    await bucket.acquire()
    assert t.now - hit >= 7
    assert bucket.rate == 5  # multiplicative decrease, and no climb while the vendor's pause held
    assert bucket.rate_at(hit + 7 + 25) == 7.5  # additive recovery in time: 1% of the configured rate a second
    assert bucket.rate_at(hit + 7 + 50.01) == 10  # back to the configured rate, never above it


async def test_client_against_simulator_429_storm_with_retry_after() -> None:
    """A real 429 with Retry-After: 3 from the simulator: nothing is sent for 3 s, then the request succeeds."""
    t = FakeTime()
    sim = IotOpenSim(seed=3, clock=t.clock)  # the simulator stamps each request it receives with the fake time
    runners = await start_sims([sim])
    try:
        sim.faults.update({"storm_429": 1, "retry_after": 3})
        bucket = TokenBucket(10, 20, clock=t.clock, sleep=t.sleep)
        async with aiohttp.ClientSession() as session:
            client = VendorClient(session, bucket, timeout=5, sleep=t.sleep)
            resp = await client.request("GET", f"{sim.url}/api/v2/installationinfo",
                                        headers={"X-API-Key": sim.source_config()["api_key"]},
                                        params={"assigned": "false"})
            assert resp.status == 200
            received = [r.at for r in sim.requests]
            assert len(received) == 2 and received[1] - received[0] >= 3
    finally:
        for r in runners:
            await r.cleanup()


async def test_client_gives_up_after_persistent_429() -> None:
    t = FakeTime()
    sim = IotOpenSim(seed=3)
    runners = await start_sims([sim])
    try:
        sim.faults.update({"storm_429": 1000})
        async with aiohttp.ClientSession() as session:
            client = VendorClient(session, TokenBucket(10, 20, clock=t.clock, sleep=t.sleep), timeout=5,
                                  sleep=t.sleep, retry=RetryPolicy(rate_limited_attempts=5))
            with pytest.raises(RateLimited):
                await client.request("GET", f"{sim.url}/api/v2/installationinfo")
            assert client.bucket.rate < 10
    finally:
        for r in runners:
            await r.cleanup()
