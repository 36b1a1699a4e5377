"""Connectors by vendor name (registered here explicitly, never by import side effect)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp

from syncd.http import TokenBucket, VendorClient
from syncd.settings import SourceSettings
from syncd.sources.base import Source
from syncd.sources.ioto import IotoSource
from syncd.sources.iotopen import IotOpenSource
from syncd.sources.ixon import IxonSource
from syncd.sources.navixy import NavixySource
from syncd.sources.proxus import ProxusSource

SOURCES: dict[str, type[Source]] = {
    "iotopen": IotOpenSource,
    "proxus": ProxusSource,
    "ioto": IotoSource,
    "ixon": IxonSource,
    "navixy": NavixySource,
}


def build_source(cfg: SourceSettings, session: aiohttp.ClientSession, *, share: float = 1.0,
                 clock: Callable[[], float] = time.time, **client: Any) -> Source:
    """The configured source with its own client and throttle: its rate and burst (the vendor's defaults where
    unset), times `share` (a backfill takes part of the budget); `client` overrides VendorClient settings."""
    cls = SOURCES[cfg.vendor]
    rate = (cfg.rate or cls.default_rate) * share
    burst = max(1, int((cfg.burst or cls.default_burst) * share))
    settings: dict[str, Any] = {"timeout": cfg.timeout, "concurrency": cfg.concurrency, "tls_verify": cfg.tls_verify,
                                "map_error": cls.map_error, "name": cfg.name, "max_retry_after": cfg.max_retry_after}
    return cls(cfg, VendorClient(session, TokenBucket(rate, burst), **(settings | client)), clock=clock)
