"""Sinks by name; build_sinks makes the ones a configuration enables."""

from __future__ import annotations

from syncd.settings import Settings
from syncd.sinks.base import Sink
from syncd.sinks.clickhouse import ClickHouseSink
from syncd.sinks.mqtt import MqttSink


def build_sinks(settings: Settings) -> list[Sink]:
    ch = settings.clickhouse
    clickhouse = ClickHouseSink(settings.clickhouse_dsn, ch.database, cluster=ch.cluster, ttl=ch.ttl,
                                batch_rows=ch.batch_rows, batch_age=ch.batch_age, instance=settings.syncd.instance)
    clickhouse.schema_recheck = ch.schema_recheck
    sinks: list[Sink] = [clickhouse]
    if settings.mqtt is not None:
        sinks.append(MqttSink(settings.mqtt, instance=settings.syncd.instance))
    return sinks
