"""Checks beyond validation that `syncd check` reports as warnings (they do not fail the config)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import Counter

import aiohttp
from pydantic import ValidationError

from syncd.errors import SyncdError
from syncd.http import RetryPolicy, TokenBucket, VendorClient
from syncd.settings import NavixySource as NavixyConfig
from syncd.settings import Settings
from syncd.sources.mqtt_push import topic_matches

CHECK_RETRY = RetryPolicy(attempts=2, rate_limited_attempts=3, cap=2.0)  # `check` answers fast, the daemon retries
CHECK_TIMEOUT = 15.0
CHECK_DISCOVER_TIMEOUT = 120.0  # `check --discover`: longest one source's discovery may take


def warnings(settings: Settings, path: str | None = None) -> list[str]:
    """What an operator should hear at start: risky settings and a config file others can read."""
    out = []
    if path is not None and os.path.exists(path) and os.stat(path).st_mode & 0o004:
        out.append(f"{path} is readable by every user on this machine; it may hold credentials: chmod 600 {path}")
    for i, s in enumerate(settings.sources):
        if not s.tls_verify:
            out.append(f"sources[{i}] ({s.name}): tls_verify = false: the vendor's certificate is not checked")
    if settings.mqtt is not None and not settings.mqtt.tls_verify:
        out.append("mqtt.tls_verify = false: the broker's certificate is not checked")
    if not settings.sources:
        out.append("no [[sources]] configured: syncd has nothing to sync")
    for i, s in enumerate(settings.sources):
        if s.interval < 1:
            out.append(f"sources[{i}].interval: {s.interval}s is very short; vendors may rate-limit")
        if isinstance(s, NavixyConfig) and s.enabled and "telemetry" in (s.streams or ["telemetry"]):
            if not (s.mqtt_url and s.topics):
                out.append(f"sources[{i}] ({s.name}): Navixy telemetry arrives only by MQTT: set mqtt_url and topics")
    return out


async def network_warnings(settings: Settings) -> list[str]:
    """Checks that ask the vendor; a network failure is a warning too, never a crash."""
    out: list[str] = []
    for i, s in enumerate(settings.sources):
        if isinstance(s, NavixyConfig) and s.enabled and s.topics:
            out += await _navixy_topics(i, s)
    return out


async def _navixy_topics(i: int, cfg: NavixyConfig) -> list[str]:
    """Each configured topic filter should match a topic that an enabled flow's MQTT output endpoint publishes to."""
    from syncd.sources.navixy import NavixySource

    where = f"sources[{i}] ({cfg.name})"
    async with aiohttp.ClientSession() as session:
        bucket = TokenBucket(cfg.rate or NavixySource.default_rate, cfg.burst or NavixySource.default_burst)
        client = VendorClient(session, bucket, timeout=min(cfg.timeout, CHECK_TIMEOUT), tls_verify=cfg.tls_verify,
                              retry=CHECK_RETRY, map_error=NavixySource.map_error)
        try:
            outputs = await NavixySource(cfg, client).mqtt_outputs()
        except (SyncdError, ValidationError) as err:
            return [f"{where}: could not check the Navixy flows: {err}"]
    published = sorted({t for flow, ep in outputs if flow.enabled and ep.type == "output_mqtt_client" for t in ep.topics})
    out = []
    for j, wanted in enumerate(cfg.topics):
        if not any(topic_matches(wanted, t) for t in published):
            out.append(f"{where}.topics[{j}]: no enabled Navixy flow has an MQTT output endpoint publishing to "
                       f"{wanted!r} (enabled flows publish to {published or 'nothing'})")
    return out


# -- the request budget: streams × 1/interval against the rate ------------------------------------------------

def budget_warnings(settings: Settings, streams: dict[str, int], counted: str) -> list[str]:
    """Each polled stream asks at least once per interval: warn where the streams need more than the source's rate.

    `streams`: polled streams per source name; `counted` says where that count comes from. A lower bound: a
    stream run that pages, or asks per tag (IXON DataList), needs more than one request.
    """
    from syncd.sources import SOURCES

    out = []
    for i, s in enumerate(settings.sources):
        n = streams.get(s.name, 0)
        rate = s.rate or SOURCES[s.vendor].default_rate
        need = n / s.interval
        if s.enabled and need > rate:
            out.append(f"sources[{i}] ({s.name}): {n:,} streams ({counted}) at {s.interval:g} s need >= {_num(need)} "
                       f"req/s; {s.name}'s rate is {_num(rate)}, so each stream runs every {_num(n / rate)} s at best "
                       f"(raise `interval`, or `rate` if the vendor allows)")
    return out


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def spooled_streams(settings: Settings) -> dict[str, int]:
    """Streams per source that hold a cursor in the state file (what the daemon ran); {} before the first run."""
    path = settings.syncd.data_dir / "state.db"
    if not path.exists():
        return {}
    from syncd.spool import Spool

    try:
        spool = Spool(path)
    except sqlite3.Error:  # locked or unreadable: the daemon's own problem to report, not the config's
        return {}
    try:
        return dict(Counter(source for source, _ in spool.cursors()))
    finally:
        spool.close()


async def discovered_streams(settings: Settings) -> tuple[dict[str, int], list[str]]:
    """Discover each enabled source at its own rate (this calls the vendor) and count the streams this shard polls.

    Returns the counts and a warning per source that could not be discovered.
    """
    from syncd.scheduler import in_shard
    from syncd.sources import build_source

    counts: dict[str, int] = {}
    out: list[str] = []
    async with aiohttp.ClientSession() as session:
        for i, cfg in enumerate(settings.sources):
            if not cfg.enabled:
                continue
            source = build_source(cfg, session, timeout=min(cfg.timeout, CHECK_TIMEOUT), retry=CHECK_RETRY)
            try:
                async with asyncio.timeout(CHECK_DISCOVER_TIMEOUT):
                    await source.login()
                    streams = await source.discover()
            except TimeoutError as err:  # ours, or the vendor's (VendorTimeout is a TimeoutError too)
                out.append(f"sources[{i}] ({cfg.name}): could not discover its streams: "
                           f"{err or f'still discovering after {CHECK_DISCOVER_TIMEOUT:g} s'}")
                continue
            except (SyncdError, ValidationError) as err:
                out.append(f"sources[{i}] ({cfg.name}): could not discover its streams: {err}")
                continue
            counts[cfg.name] = sum(1 for st in streams if not st.push
                                   and in_shard(cfg.name, st.tenant, settings.syncd.shard_index))
    return counts, out
