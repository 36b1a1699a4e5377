"""`syncd status`: streams, sinks and sources from state.db after a run, and beside a running daemon (its /metrics)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from syncd.settings import load
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sim.proxus import ProxusSim
from syncd.status import Samples, by, parse_metrics, render_status, scrape
from tests.conftest import free_port
from tests.helpers import popen_syncd, syncd, truth_keys, write_config

AGO = re.compile(r"^(\d+s|\d+m\d\ds) ago$")
DURATION = re.compile(r"^(\d+s|\d+m\d\ds|\d+h\d\dm)$")


def status_text(cfg: Path) -> tuple[int, str]:
    console = Console(record=True, width=160)
    code = render_status(load(cfg), console=console)
    return code, console.export_text()


def rows(text: str, title: str) -> list[list[str]]:
    """The body rows of the table whose title line starts with `title`, as stripped cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    out = []
    for line in lines[start + 1:]:
        if line.startswith("└"):
            return out
        if line.startswith("│"):
            out.append([cell.strip() for cell in line.split("│")[1:-1]])
    raise AssertionError(f"table {title!r} has no end:\n{text}")


def test_after_a_run_every_stream_sink_and_source_has_its_row(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=71, installations=2, topics_per_installation=4, log_points=600)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        run = syncd("run", "--config", str(cfg), "--once")
    assert run.returncode == 0, run.stderr[-3000:]
    code, text = status_text(cfg)
    assert code == 0, text
    assert text.splitlines()[0] == (f"state {tmp_path / 'data' / 'state.db'} · "
                                    "[syncd] http is off: late rows and rates are not available")
    tenants = sorted({key[1] for key in truth_keys(sim)})
    streams = rows(text, "streams: 4 (4 ok, 0 failing, 0 without a recorded run)")
    assert [r[:2] for r in streams] == sorted(["iotopen-sim", f"{kind}/{t}"] for kind in ("log", "status") for t in tenants)
    for _source, stream, cursor, last_success, lag, error, late, dead in streams:
        assert cursor.startswith("hw 20" if stream.startswith("log/") else "max 20"), (stream, cursor)
        assert AGO.match(last_success) and DURATION.match(lag), (stream, last_success, lag)
        assert (error, late, dead) == ("-", "-", "0")  # no metrics endpoint: late rows are not known
    assert rows(text, "sinks") == [["clickhouse", "ok", "0", "0 B", "0", "-", "0", "-"]]
    assert rows(text, "sources") == [["iotopen-sim", "iotopen", "ok", "4", "-", "-", "10 req/s", "-"]]


def test_a_refused_key_shows_on_its_source_and_the_streams_keep_their_last_success(tmp_path: Path) -> None:
    sim = IotOpenSim(seed=72, installations=1, topics_per_installation=3, log_points=100)
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim])
        assert syncd("run", "--config", str(cfg), "--once").returncode == 0
        cfg.write_text(cfg.read_text().replace(sim.api_key, "wrong-key-0123456789"))
        assert syncd("run", "--config", str(cfg), "--once").returncode == 1
    code, text = status_text(cfg)
    assert code == 0
    assert "wrong-key-0123456789" not in text
    (source,) = rows(text, "sources")
    assert source[:7] == ["iotopen-sim", "iotopen", "auth_failed", "2", "-", "-", "10 req/s"]
    assert source[7].startswith("VendorAuthError: credential refused (401)"), source
    streams = rows(text, "streams: 2 (2 ok, 0 failing, 0 without a recorded run)")
    assert len(streams) == 2 and all(AGO.match(r[3]) for r in streams), streams


def test_no_state_file_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(f'[syncd]\ndata_dir = "{tmp_path / "nowhere"}"\n')
    code, text = status_text(cfg)
    assert code == 1
    assert text == f"no state file at {tmp_path / 'nowhere' / 'state.db'}: syncd has not run with this data_dir\n"
    assert not (tmp_path / "nowhere").exists()  # status never creates the daemon's state


def wait_for(url: str, what: str, ok: Callable[[Samples], bool], timeout: float = 90.0) -> Samples:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = scrape(url)
        if samples is not None and ok(samples):
            return samples
        time.sleep(0.2)  # polling a condition, bounded by the deadline
    raise AssertionError(f"timed out waiting for {what}")


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for k, v in by(samples, name, *labels).items() if k == tuple(labels.values()))


def test_while_the_daemon_runs_status_reads_beside_it_with_late_rows_and_rates(tmp_path: Path) -> None:
    """Late rows land while the daemon runs; the MQTT sink's broker is down, so its backlog holds every event."""
    sim = ProxusSim(seed=73, rows=3000, history=4 * 3600, alerts=5, late_rows=7, late_by=7200)
    port, dead_broker = free_port(), free_port()
    with sims_in_thread([sim]):
        cfg = write_config(tmp_path, [sim], f'\n[mqtt]\nurl = "mqtt://127.0.0.1:{dead_broker}"\n')
        cfg.write_text(cfg.read_text().replace('http = ""', f'http = "127.0.0.1:{port}"')
                       .replace('interval = "5s"', 'interval = "1s"\nlate_window = "3h"\nreconcile_every = "1s"'))
        url = f"http://127.0.0.1:{port}"
        daemon = popen_syncd("run", "--config", str(cfg), stderr=subprocess.DEVNULL)
        try:
            def stored(samples: Samples) -> bool:
                events = total(samples, "syncd_events_total")
                return events > 0 and total(samples, "syncd_sink_rows_total", sink="clickhouse") == events

            wait_for(url, "the first runs stored", lambda s: stored(s) and total(s, "syncd_events_total") == 3000 - 7 + 5)
            assert sim.land_late() == 7
            after = wait_for(url, "the late rows found and stored",
                             lambda s: stored(s) and total(s, "syncd_late_rows_total") == 7)
            code, text = status_text(cfg)
            still = scrape(url)
            assert daemon.poll() is None
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
    assert code == 0, text
    assert still is not None and total(still, "syncd_events_total") == total(after, "syncd_events_total")  # quiet
    assert text.splitlines()[0] == f"state {tmp_path / 'data' / 'state.db'} · daemon answering at {url} (ready)"
    streams = rows(text, "streams: 2 (2 ok, 0 failing, 0 without a recorded run)")
    assert [(r[0], r[1], r[5], r[6], r[7]) for r in streams] == [
        ("proxus-sim", "alert", "-", "0", "0"), ("proxus-sim", "telemetry", "-", "7", "0")]
    assert all(AGO.match(r[3]) and DURATION.match(r[4]) for r in streams), streams
    assert streams[1][2].startswith("done_to 20")
    events = int(total(after, "syncd_events_total"))
    clickhouse, mqtt = rows(text, "sinks")
    # no events wait for ClickHouse (a run's status page may: each run spools one, rows 0)
    assert clickhouse[:3] == ["clickhouse", "ok", "0"] and clickhouse[6:] == ["0", "-"], clickhouse
    assert mqtt[:3] == ["mqtt", "failing", str(events)] and mqtt[6] == "0", mqtt
    assert DURATION.match(mqtt[5]) and mqtt[7].startswith("MqttError: cannot connect"), mqtt
    (source,) = rows(text, "sources")
    assert source[:4] == ["proxus-sim", "proxus", "ok", "2"] and source[5:] == ["5.0 req/s", "5 req/s", "-"], source
    assert re.match(r"^\d+\.\d (req|pages)/s$", source[4]), source


def test_metrics_text_is_read_with_escaped_label_values() -> None:
    samples = parse_metrics('# HELP x_total a\n# TYPE x_total counter\nx_total{a="q\\"uote",b="x}y"} 3.0\n'
                            'x_total{a="p",b="z"} 2\nup 1\nbad line\n')
    assert samples == {"x_total": [({"a": 'q"uote', "b": "x}y"}, 3.0), ({"a": "p", "b": "z"}, 2.0)],
                       "up": [({}, 1.0)]}
    assert by(samples, "x_total") == {(): 5.0}
