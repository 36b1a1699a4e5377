"""The request budget: the throttle's AIMD in simulated time (it recovers per second, not per success, and a rate
configured far above the vendor's limit settles under it with few 429s), and `syncd check`'s streams × 1/interval
against each source's rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd.checks import budget_warnings
from syncd.http import TokenBucket
from syncd.settings import load
from syncd.sim.broker import free_port
from syncd.sim.common import SlidingWindowLimit, sims_in_thread
from syncd.sim.ixon import IxonSim
from syncd.sim.server import config_toml
from syncd.spool import Spool
from tests.helpers import max_in_window, syncd
from tests.test_throttle import FakeTime


async def test_recovery_is_per_second_not_per_success() -> None:
    t = FakeTime()
    bucket = TokenBucket(20, 5, clock=t.clock, sleep=t.sleep)
    sent = await bucket.acquire()
    bucket.on_rate_limited(None, sent)
    assert bucket.rate == 10
    for _ in range(40):  # 40 requests through (a step per success would have been back at 20 after 10)
        await bucket.acquire()
    elapsed = t.now - 1000.0
    assert 3.5 < elapsed < 4.0  # they took 4 s at 10 to 10.8 req/s
    # + 1% of the configured rate (0.2 req/s) per second since the pause (one slot at 10/s: 0.1 s) ended
    assert bucket.rate == pytest.approx(10 + 0.2 * (elapsed - 0.1))
    assert bucket.rate_at(1000.1 + 49) == pytest.approx(19.8)  # without requests, time alone adds back
    assert bucket.rate_at(1000.1 + 50.01) == 20  # back to the configured rate after 50 s, never above it
    assert bucket.rate_at(1000.1 + 500) == 20


async def test_a_429_to_a_request_sent_before_the_decrease_does_not_decrease_again() -> None:
    t = FakeTime()
    bucket = TokenBucket(40, 4, clock=t.clock, sleep=t.sleep)
    in_flight = [await bucket.acquire() for _ in range(4)]  # the burst, all out at once
    for sent in in_flight:  # and all four refused: one decrease, not four (40 → 20, not 40 → 2.5)
        bucket.on_rate_limited(None, sent)
    assert bucket.rate == 20
    later = await bucket.acquire()  # sent after the decrease: its 429 is news
    bucket.on_rate_limited(None, later)
    assert bucket.rate == 10
    bucket.on_rate_limited(None)  # a caller that does not say when it sent: counted
    assert bucket.rate == 5


async def test_stale_429_with_retry_after_still_pauses_everything() -> None:
    t = FakeTime()
    bucket = TokenBucket(10, 2, clock=t.clock, sleep=t.sleep)
    first, second = await bucket.acquire(), await bucket.acquire()
    bucket.on_rate_limited(None, first)
    bucket.on_rate_limited(7, second)  # no second decrease, but the vendor's pause holds
    assert bucket.rate == 5
    hit = t.now
    await bucket.acquire()
    assert t.now - hit >= 7


@pytest.mark.parametrize(("limit", "configured"), [(5, 20), (10, 40), (50, 200)])
async def test_rate_4x_too_high_settles_under_the_limit_with_few_429s(limit: int, configured: float) -> None:
    """A vendor that allows `limit` requests in any second and refuses the rest at once (no Retry-After),
    a source configured 4× above it and always behind: after 30 s fewer than 5% of requests are refused."""
    t = FakeTime()
    vendor = SlidingWindowLimit(limit, 1.0, t.clock)
    bucket = TokenBucket(configured, 5, clock=t.clock, sleep=t.sleep)
    start, log = t.now, []
    while t.now < start + 600:
        sent = await bucket.acquire()
        ok = vendor.allow()
        log.append((t.now - start, ok))
        if not ok:
            bucket.on_rate_limited(None, sent)
    late = [ok for at, ok in log if at >= 30]
    refused = late.count(False) / len(late)
    answered = [at for at, ok in log if ok]
    assert refused < 0.05
    assert max_in_window(answered) <= limit  # what the vendor let through (its own check, restated)
    # and the budget is used, not starved: at least 60% of the limit on average after the first 30 s
    assert late.count(True) / 570 >= 0.6 * limit
    print(f"limit {limit}/s, rate {configured}: {100 * refused:.2f}% refused after 30 s, "
          f"{late.count(True) / 570:.2f} answered/s")


async def test_rate_right_at_the_limit_sees_no_429() -> None:
    """The bench's IXON case without buffering: rate + burst within the vendor's second, no 429 in 10 minutes."""
    t = FakeTime()
    vendor = SlidingWindowLimit(50, 1.0, t.clock)
    bucket = TokenBucket(49, 1, clock=t.clock, sleep=t.sleep)
    refused = 0
    for _ in range(49 * 600):
        await bucket.acquire()
        refused += not vendor.allow()
    assert refused == 0


# -- `syncd check`: streams × 1/interval against the rate --------------------------------------------------------


def test_budget_warning_names_streams_interval_and_rate(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text('[[sources]]\nname = "iotopen-prod"\nvendor = "iotopen"\napi_key = "k"\ninterval = "60s"\nrate = 10\n'
                    '[[sources]]\nname = "small"\nvendor = "iotopen"\napi_key = "k"\ninterval = "60s"\n'
                    '[[sources]]\nname = "off"\nvendor = "iotopen"\napi_key = "k"\ninterval = "1s"\nenabled = false\n')
    settings = load(path)
    lines = budget_warnings(settings, {"iotopen-prod": 10_000, "small": 600, "off": 10_000}, "discovered")
    assert lines == ["sources[0] (iotopen-prod): 10,000 streams (discovered) at 60 s need >= 167 req/s; iotopen-prod's "
                     "rate is 10, so each stream runs every 1,000 s at best (raise `interval`, or `rate` if the vendor "
                     "allows)"]  # small: 600 streams at 60 s need 10 req/s, its (default) rate


def test_check_counts_the_streams_in_the_state_file(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(f'[syncd]\ndata_dir = "{tmp_path}/data"\n'
                    '[[sources]]\nname = "lynx"\nvendor = "iotopen"\napi_key = "k"\ninterval = "1s"\nrate = 10\n')
    path.chmod(0o600)
    assert "warning" not in syncd("check", "--config", str(path)).stdout  # no state file yet: nothing to count
    spool = Spool(tmp_path / "data" / "state.db")
    for i in range(12):
        spool.commit_page("lynx", f"log/{i}", {}, {"offset": i})
    spool.commit_page("gone", "log/1", {}, {"offset": 1})  # a source no longer configured
    spool.close()
    r = syncd("check", "--config", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("warning: ")] == [
        "warning: sources[0] (lynx): 12 streams (with a cursor in the state file) at 1 s need >= 12 req/s; lynx's rate "
        "is 10, so each stream runs every 1.2 s at best (raise `interval`, or `rate` if the vendor allows)"]


def test_check_discover_counts_what_the_daemon_will_poll(tmp_path: Path) -> None:
    sim = IxonSim(seed=5, agents=30, tags_per_agent=2, points_per_tag=2, alarms=1)
    with sims_in_thread([sim]):
        entry = config_toml([sim], f"{tmp_path}/data").replace('interval = "5s"', 'interval = "1s"\nrate = 20')
        offline = entry.split("[[sources]]", 1)[1].replace('name = "ixon-sim"', 'name = "offline"').replace(
            sim.url, f"http://127.0.0.1:{free_port()}")
        path = tmp_path / "syncd.toml"
        path.write_text(entry + "\n[[sources]]" + offline)
        path.chmod(0o600)
        r = syncd("check", "--config", str(path), "--discover", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: ")]
    assert warnings[0].startswith("warning: sources[1] (offline): could not discover its streams: ")
    # 30 agents × (telemetry, alert)
    assert warnings[1:] == [
        "warning: sources[0] (ixon-sim): 60 streams (discovered) at 1 s need >= 60 req/s; ixon-sim's rate is 20, "
        "so each stream runs every 3 s at best (raise `interval`, or `rate` if the vendor allows)"]
    assert "Traceback" not in r.stderr
