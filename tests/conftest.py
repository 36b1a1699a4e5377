"""Shared fixtures: a private Mosquitto broker on a free port, free ports, data dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.sim.broker import LocalMosquitto as Mosquitto
from syncd.sim.broker import free_port
from tests.chhttp import ClickHouseHttp

__all__ = ["Mosquitto", "free_port"]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ClickHouseHttp]:
    """A ClickHouse HTTP server (tests/chhttp.py) in its own process, stopped after the test."""
    srv = ClickHouseHttp(tmp_path / "chserver").start()
    try:
        yield srv
    finally:
        srv.stop()
