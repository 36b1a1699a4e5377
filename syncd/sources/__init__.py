"""Connectors by vendor name (registered here explicitly, never by import side effect)."""

from __future__ import annotations

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
