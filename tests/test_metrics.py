"""/metrics through prometheus-client: every family declared once with its HELP, every call site naming a declared
family with exactly its labels, and a live daemon's output accepted by `promtool check metrics`."""

from __future__ import annotations

import ast
import math
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncd.observability import FAMILIES, Metrics
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sim.proxus import ProxusSim
from syncd.sources import SOURCES
from syncd.spool import Spool
from tests.conftest import free_port
from tests.helpers import ch, popen_syncd, write_config
from tests.mqtt_helpers import wait_for

SYNCD = Path(__file__).resolve().parent.parent / "syncd"
KIND_OF_CALL = {"inc": {"counter"}, "count_to": {"counter"}, "set": {"gauge"}, "observe": {"histogram"}, "get": {"counter", "gauge"},
                "total": {"counter"}}


def _metric_calls() -> list[tuple[str, int, str, str, set[str]]]:
    """(file, line, method, family, label names) of every `….metrics.<method>("syncd_…", …)` in the package."""
    calls = []
    for path in sorted(SYNCD.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in KIND_OF_CALL and node.args):
                continue
            owner = node.func.value
            if not ((isinstance(owner, ast.Attribute) and owner.attr == "metrics")
                    or (isinstance(owner, ast.Name) and owner.id == "metrics")):
                continue
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                f"{path}:{node.lineno}: a metric name must be a literal (so this test can check it)"
            labels = {k.arg for k in node.keywords if k.arg is not None}
            calls.append((str(path.relative_to(SYNCD.parent)), node.lineno, node.func.attr, first.value, labels))
    return calls


def test_every_call_names_a_declared_family_of_its_type_with_exactly_its_labels_and_every_family_is_fed() -> None:
    calls = _metric_calls()
    wrong = [(f, line, method, name, sorted(labels)) for f, line, method, name, labels in calls
             if name not in FAMILIES or FAMILIES[name].type not in KIND_OF_CALL[method]
             or (method != "total" and labels != set(FAMILIES[name].labels))]
    assert wrong == []
    fed = {name for _, _, method, name, _ in calls if method in ("inc", "count_to", "set", "observe")}
    assert fed == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.help.endswith(".") and "\n" not in family.help and "\\" not in family.help, name
        assert (family.type == "counter") == name.endswith("_total"), name
        assert list(family.labels) == sorted(family.labels), name  # the order the text format prints them in
        assert bool(family.buckets) == (family.type == "histogram"), name


def test_each_registry_is_its_own_and_reads_back_what_was_counted() -> None:
    a, b = Metrics(), Metrics()
    a.inc("syncd_events_total", 5, source="s", kind="log")
    a.inc("syncd_events_total", 2, source="s", kind="status")
    a.inc("syncd_events_total", source="t", kind="log")
    a.set("syncd_pollers_paused", 1)
    a.observe("syncd_sink_write_seconds", 0.03, sink="clickhouse")
    assert a.get("syncd_events_total", source="s", kind="log") == 5.0
    assert a.get("syncd_events_total", source="s", kind="alert") == 0.0
    assert a.total("syncd_events_total") == 8.0
    assert a.get("syncd_pollers_paused") == 1.0
    assert b.total("syncd_events_total") == 0.0 and b.get("syncd_pollers_paused") == 0.0
    with pytest.raises(KeyError, match="syncd_event_total"):
        a.inc("syncd_event_total", source="s", kind="log")
    with pytest.raises(ValueError):
        a.inc("syncd_events_total", source="s")  # a label short
    text = a.render()
    assert "_created" not in text and "python_" not in text and "process_" not in text
    assert 'syncd_sink_write_seconds_bucket{le="0.05",sink="clickhouse"} 1.0' in text
    assert 'syncd_sink_write_seconds_bucket{le="0.025",sink="clickhouse"} 0.0' in text
    assert 'syncd_sink_write_seconds_count{sink="clickhouse"} 1.0' in text
    assert "syncd_sink_write_seconds_count" not in b.render()


def test_spool_backlogs_are_rows_bytes_and_age_per_sink(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["clickhouse", "mqtt"])
    pages = [{"src": "s", "vendor": "v", "stream": "t", "e": [[i, "s"] for i in range(n)]} for n in (3, 5)]
    before = time.time()
    for page in pages:
        spool.commit_page("s", "t", page, None)
    batch = spool.next_batch("clickhouse", 100)
    assert batch is not None
    spool.ack(batch)
    backlogs = spool.backlogs()
    spool.close()
    rows, size, age = backlogs["mqtt"]
    assert backlogs["clickhouse"] == (0, 0, None)
    assert (rows, size) == (8, sum(len(orjson.dumps(p)) for p in pages))
    assert age is not None and 0 <= age <= time.time() - before


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make promtool` (or `apt-get install prometheus`, the Debian package "
                    "that ships it) installs it; this test checks /metrics with it and does not skip")
    return path


def _scrape(port: int) -> tuple[str, dict[str, list[Any]]]:
    """The raw text and, per family, its samples as prometheus-client's own parser reads them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = list(family.samples)
    return text, families


def _value(families: dict[str, list[Any]], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in families.get(family, []) if s.name == sample and s.labels == labels]
    return found[0] if found else math.nan


def _by(families: dict[str, list[Any]], family: str, sample: str, label: str) -> dict[str, float]:
    """A sample's values summed per value of one label."""
    out: dict[str, float] = {}
    for s in families.get(family, []):
        if s.name == sample:
            out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


def test_a_live_daemons_metrics_pass_promtool_with_help_histograms_throttles_backlogs_and_dead_letters(
        tmp_path: Path, mosquitto: Any) -> None:
    promtool = _promtool()
    iotopen = IotOpenSim(seed=61, installations=2, topics_per_installation=3, log_points=400)
    proxus = ProxusSim(seed=62, rows=2000, alerts=5, malformed_rows=10)
    throttled = IotOpenSim(seed=63, installations=1, log_points=10)
    throttled.faults.update({"storm_429": 1, "retry_after": 300})  # its first request: halved, then blocked for 5 min
    port = free_port()
    started = time.time()
    with sims_in_thread([iotopen, proxus, throttled]):
        cfg = write_config(tmp_path, [iotopen, proxus, throttled],
                           f'\n[clickhouse]\nbatch_age = "200ms"\n\n[mqtt]\nurl = "{mosquitto.url}"\n')
        text = cfg.read_text().replace('http = ""', f'http = "127.0.0.1:{port}"').replace('"5s"', '"1s"')
        second = text.index('name = "iotopen-sim"', text.index('name = "iotopen-sim"') + 1)
        cfg.write_text(text[:second] + 'name = "throttled"' + text[second + len('name = "iotopen-sim"'):])
        truth = len(iotopen.ground_truth())
        log = (tmp_path / "syncd.log").open("w")
        daemon = popen_syncd("run", "--config", str(cfg), stderr=log)
        try:
            def scrape() -> tuple[str, dict[str, list[Any]]]:
                assert daemon.poll() is None, (tmp_path / "syncd.log").read_text()[-3000:]
                return _scrape(port)

            def caught_up() -> tuple[str, dict[str, list[Any]]] | None:
                text, m = scrape()
                events = _by(m, "syncd_events", "syncd_events_total", "source")
                backlog = _by(m, "syncd_spool_backlog_rows", "syncd_spool_backlog_rows", "sink")
                ok = (events.get("iotopen-sim") == truth and events.get("proxus-sim", 0) > 0
                      and backlog == {"clickhouse": 0.0, "mqtt": 0.0})
                return (text, m) if ok else None

            _, m = wait_for(caught_up, timeout=90)
            streams = _by(m, "syncd_stream_lag_seconds", "syncd_stream_lag_seconds", "source")  # a series per stream
            assert set(streams) == {"iotopen-sim", "proxus-sim"}
            n_streams = {s: len([x for x in m["syncd_stream_lag_seconds"] if x.labels["source"] == s]) for s in streams}
            pages_then = _by(m, "syncd_pages", "syncd_pages_total", "source")

            def runs_later() -> tuple[str, dict[str, list[Any]]] | None:
                # a few more runs of every stream, and a scrape between pages: each fetch observed was committed
                text, m = scrape()
                pages = _by(m, "syncd_pages", "syncd_pages_total", "source")
                fetched = _by(m, "syncd_page_fetch_seconds", "syncd_page_fetch_seconds_count", "source")
                ok = (all(pages.get(s, 0) >= pages_then[s] + 3 * n_streams[s] for s in n_streams) and pages == fetched)
                return (text, m) if ok else None

            text, m = wait_for(runs_later, timeout=90)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=120)
            log.close()
        assert daemon.returncode == 0, (tmp_path / "syncd.log").read_text()[-3000:]
        (letters,) = ch(tmp_path / "data", "SELECT source, stream, count() FROM syncd.dead_letter FINAL "
                                           "GROUP BY source, stream ORDER BY source, stream")

    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stdout, check.stderr) == (0, "", ""), text[:3000]

    lines = text.splitlines()
    assert {line.split()[2] for line in lines if line.startswith("# HELP ")} == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert lines.count(f"# HELP {name} {family.help}") == 1, name
        assert lines.count(f"# TYPE {name} {family.type}") == 1, name

    # histograms: buckets as declared, cumulative, +Inf == _count; one series per (kind, source) and per sink
    for name in ("syncd_page_fetch_seconds", "syncd_sink_write_seconds"):
        family, samples = FAMILIES[name], m[name]
        series = {tuple(sorted((k, v) for k, v in s.labels.items())) for s in samples if s.name == f"{name}_count"}
        assert series, name
        for key in series:
            labels = dict(key)
            buckets = [(s.labels["le"], s.value) for s in samples
                       if s.name == f"{name}_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels]
            assert [float(le) for le, _ in buckets] == [*family.buckets, math.inf]
            counts = [v for _, v in buckets]
            assert counts == sorted(counts) and counts[-1] == _value(m, name, f"{name}_count", **labels) > 0
            assert _value(m, name, f"{name}_sum", **labels) > 0
    fetch_series = {(s.labels["source"], s.labels["kind"]) for s in m["syncd_page_fetch_seconds"]}
    assert fetch_series == {(s.labels["source"], s.labels["kind"]) for s in m["syncd_events"]}
    for sink in ("clickhouse", "mqtt"):
        assert (_value(m, "syncd_sink_write_seconds", "syncd_sink_write_seconds_count", sink=sink)
                == _value(m, "syncd_sink_batches", "syncd_sink_batches_total", sink=sink))

    # throttles: untouched at the configured rate; the one that met a 429 halved (and blocked by Retry-After)
    rate = SOURCES["iotopen"].default_rate
    assert _by(m, "syncd_throttle_max_rate", "syncd_throttle_max_rate", "source") == {
        "iotopen-sim": rate, "proxus-sim": SOURCES["proxus"].default_rate, "throttled": rate}
    assert _by(m, "syncd_throttle_rate", "syncd_throttle_rate", "source") == {
        "iotopen-sim": rate, "proxus-sim": SOURCES["proxus"].default_rate, "throttled": rate / 2}

    requests = _by(m, "syncd_http_requests", "syncd_http_requests_total", "source")
    pages = _by(m, "syncd_pages", "syncd_pages_total", "source")
    assert set(requests) == {"iotopen-sim", "proxus-sim", "throttled"} and requests["throttled"] >= 1
    assert requests["iotopen-sim"] > pages["iotopen-sim"] and requests["proxus-sim"] > pages["proxus-sim"]  # + discovery

    # spool backlog per sink: all delivered; lag and cursor time per stream agree on when the last page was stored
    assert _by(m, "syncd_spool_backlog_rows", "syncd_spool_backlog_rows", "sink") == {"clickhouse": 0.0, "mqtt": 0.0}
    for family in ("syncd_spool_backlog_bytes", "syncd_spool_backlog_age_seconds"):
        assert set(_by(m, family, family, "sink")) == {"clickhouse", "mqtt"}
    cursors = {(s.labels["source"], s.labels["stream"]): s.value for s in m["syncd_stream_cursor_timestamp_seconds"]}
    lags = {(s.labels["source"], s.labels["stream"]): s.value for s in m["syncd_stream_lag_seconds"]}
    assert cursors and set(cursors) <= set(lags)
    assert all(started <= cursors[k] + lags[k] <= time.time() for k in cursors), (cursors, lags)

    # dead letters per stream, exactly what the dead_letter table holds
    dead = {(s.labels["source"], s.labels["stream"]): s.value for s in m["syncd_dead_letters"]}
    assert dead == {(src, stream): float(n) for src, stream, n in letters}
    assert dead.get(("proxus-sim", "telemetry"), 0) >= 8
