"""Checks beyond validation that `syncd check` reports as warnings (they do not fail the config)."""

from __future__ import annotations

import os

import aiohttp
from pydantic import ValidationError

from syncd.errors import SyncdError
from syncd.http import RetryPolicy, TokenBucket, VendorClient
from syncd.settings import NavixySource as NavixyConfig
from syncd.settings import Settings
from syncd.sources.mqtt_push import topic_matches

CHECK_RETRY = RetryPolicy(attempts=2, rate_limited_attempts=3, cap=2.0)  # `check` answers fast, the daemon retries
CHECK_TIMEOUT = 15.0


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
