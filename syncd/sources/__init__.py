"""Connectors by vendor name (registered here explicitly, never by import side effect)."""

from __future__ import annotations

from syncd.sources.base import Source
from syncd.sources.iotopen import IotOpenSource

SOURCES: dict[str, type[Source]] = {
    "iotopen": IotOpenSource,
}
