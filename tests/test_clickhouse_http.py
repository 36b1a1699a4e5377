"""The `http://` ClickHouse path, against tests/chhttp.py: ClickHouse's HTTP interface over the embedded engine.

clickhouse-connect talks HTTP to a separate server process on a real socket; every statement runs on the
engine, so deduplication, schema errors and counts are the engine's own.
"""

from __future__ import annotations

import base64
import http.client
import os
import random
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, ProgrammingError

from syncd.sim.common import VendorSim, sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sinks.schema import migrations
from tests.chhttp import ClickHouseError, ClickHouseHttp, parse_statement
from tests.conftest import free_port
from tests.helpers import ch, logged, popen_syncd, status_row, syncd, syncd_status, truth_keys, write_config
from tests.mqtt_helpers import metrics, wait_for

OUTAGE_S = float(os.environ.get("SYNCD_CH_OUTAGE_S", "20"))


def _with_database(srv: ClickHouseHttp) -> ClickHouseHttp:
    """What an operator does first on a server; syncd cannot yet (see test_schema_apply_on_a_fresh_server)."""
    client = srv.client()
    try:
        client.command("CREATE DATABASE IF NOT EXISTS syncd")
    finally:
        client.close()
    return srv


def _q(srv: ClickHouseHttp, *sql: str) -> list[list[tuple[Any, ...]]]:
    client = srv.client()
    try:
        return [list(client.query(s).result_rows) for s in sql]
    finally:
        client.close()


def _config(tmp: Path, sims: list[VendorSim], srv: ClickHouseHttp, *, http_port: int | None = None,
            page_size: int = 500) -> Path:
    cfg = write_config(tmp, sims, f'\n[clickhouse]\ndsn = "{srv.dsn}"\nbatch_age = "200ms"\n')
    text = cfg.read_text().replace('interval = "5s"', f'interval = "1s"\npage_size = {page_size}')
    if http_port:
        text = text.replace('http = ""', f'http = "127.0.0.1:{http_port}"')
    cfg.write_text(text)
    return cfg


def _stored_keys(srv: ClickHouseHttp, vendor: str) -> dict[tuple[str, str, str, str, int], tuple[Any, Any]]:
    (rows,) = _q(srv, "SELECT kind, tenant, device, metric, toUnixTimestamp64Milli(ts), value, text "
                      f"FROM syncd.events FINAL WHERE vendor = '{vendor}'")
    return {(r[0], r[1], r[2], r[3], int(r[4])): (r[5], r[6]) for r in rows}


def _counts(srv: ClickHouseHttp) -> tuple[int, int, int]:
    """count() over events FINAL, uniqExact(event_id), raw count()."""
    ((final, uniq),), ((raw,),) = _q(srv, "SELECT count(), uniqExact(event_id) FROM syncd.events FINAL",
                                     "SELECT count() FROM syncd.events")
    return int(final), int(uniq), int(raw)


def _total(m: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


def _stop_daemon(proc: subprocess.Popen[str], log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=90)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_statements_split_from_their_data_by_clickhouse_rules() -> None:
    native = b"\x0c\x03" + bytes(range(256))  # 12 columns: the first byte is a form feed, data all the same
    st = parse_statement(b"INSERT INTO `syncd`.`events` (`event_id`, `ts`) SETTINGS a = 1 FORMAT Native\n" + native)
    assert (st.sql, st.insert_format, st.data) == ("INSERT INTO `syncd`.`events` (`event_id`, `ts`) SETTINGS a = 1 ",
                                                   "Native", native)
    assert (st.database, st.table, st.columns) == ("syncd", "events", ["event_id", "ts"])
    st = parse_statement(b"insert into t values (1, 'FORMAT x'), (2, ')')")
    assert (st.sql, st.insert_format, st.data) == ("insert into t ", "Values", b" (1, 'FORMAT x'), (2, ')')")
    st = parse_statement(b"INSERT INTO format (a) SELECT 1 AS format")
    assert st.insert_format is None and st.table == "format" and st.sql == "INSERT INTO format (a) SELECT 1 AS format"
    st = parse_statement(b"SELECT format('{}', 'a') AS f, 'FORMAT JSON' -- FORMAT CSV\n FORMAT Native")
    assert (st.kind, st.output_format, st.produces_result) == ("SELECT", "Native", True)
    assert parse_statement(b"SELECT 1 FORMAT TSV SETTINGS max_threads = 1;").output_format == "TSV"
    assert not parse_statement(b"/* x */ CREATE TABLE t (a UInt8) ENGINE = Memory").produces_result
    for sql, code in [(b"SELECT 1; SELECT 2", 62), (b"  ", 62), (b"INSERT INTO t FORMAT CSV;1", 62),
                      (b"INSERT INTO t FROM INFILE 'x' FORMAT CSV", 78), (b"SELECT 1 INTO OUTFILE 'x'", 358)]:
        with pytest.raises(ClickHouseError) as err:
            parse_statement(sql)
        assert err.value.code == code, sql


# -- clickhouse-connect against the server --------------------------------------------------------------

def test_client_roundtrip_dedup_and_errors(server: ClickHouseHttp) -> None:
    client = server.client()
    try:
        assert client.server_version == client.command("SELECT version()")
        client.command("CREATE DATABASE t1")
        client.command("CREATE TABLE t1.rows (id UInt64, name LowCardinality(String), v Nullable(Float64), "
                       "tags Map(LowCardinality(String), String)) ENGINE = MergeTree ORDER BY id "
                       "SETTINGS non_replicated_deduplication_window = 100")
        columns: list[list[Any]] = [list(range(1000)), [f"n{i % 7}" for i in range(1000)],
                   [None if i % 5 == 0 else i / 4 for i in range(1000)], [{"k": str(i)} for i in range(1000)]]
        names = ["id", "name", "v", "tags"]
        first = client.insert("t1.rows", columns, column_names=names, column_oriented=True,
                              settings={"insert_deduplication_token": "batch-1"})
        assert first.written_rows == 1000
        # the same batch again (a retry): the engine deduplicates it by the token
        client.insert("t1.rows", columns, column_names=names, column_oriented=True,
                      settings={"insert_deduplication_token": "batch-1"})
        assert client.command("SELECT count() FROM t1.rows") == 1000
        # a different token is a different batch
        client.insert("t1.rows", [c[:10] for c in columns], column_names=names, column_oriented=True,
                      settings={"insert_deduplication_token": "batch-2"})
        assert client.command("SELECT count() FROM t1.rows") == 1010
        rows = client.query("SELECT id, name, v, tags FROM t1.rows WHERE id IN (0, 1, 999) ORDER BY id, v").result_rows
        assert rows == [(0, "n0", None, {"k": "0"}), (0, "n0", None, {"k": "0"}), (1, "n1", 0.25, {"k": "1"}),
                        (1, "n1", 0.25, {"k": "1"}), (999, "n5", 249.75, {"k": "999"})]
        with pytest.raises(DatabaseError) as err:
            client.query("SELECT nope FROM t1.rows")
        assert err.value.code == 47 and "UNKNOWN_IDENTIFIER" in str(err.value)
        with pytest.raises(DatabaseError) as err:
            client.command("SELECT 1", settings={"no_such_setting_x": 1})
        assert err.value.code == 115
    finally:
        client.close()
    # a GET runs read-only, as on a server; Basic credentials in the request
    auth = {"Authorization": "Basic " + base64.b64encode(b"default:secret").decode()}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # keep-alive: one socket, three requests
    try:
        for path, want in [("/ping", b"Ok.\n"), ("/?query=SELECT%20currentDatabase()", b"default\n"),
                           ("/?query=SELECT%20currentDatabase()&database=t1", b"t1\n")]:
            conn.request("GET", path, headers=auth)
            r = conn.getresponse()
            assert (r.status, r.getheader("Connection"), r.read()) == (200, None, want)
        sock = conn.sock
        conn.request("GET", "/ping")
        assert conn.getresponse().read() == b"Ok.\n" and conn.sock is sock
    finally:
        conn.close()
    with urllib.request.urlopen(urllib.request.Request(f"{server.base}/?query=SELECT%201%2B1", headers=auth)) as r:
        assert (r.read(), r.headers["X-ClickHouse-Format"]) == (b"2\n", "TabSeparated")
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(urllib.request.Request(f"{server.base}/?query=CREATE%20DATABASE%20t2", headers=auth))
    assert http_err.value.code == 500 and http_err.value.headers["X-ClickHouse-Exception-Code"] == "164"
    assert b"(READONLY)" in http_err.value.read()
    with pytest.raises(DatabaseError) as err:
        clickhouse_connect.get_client(host="127.0.0.1", port=server.port, username="default", password="wrong")
    assert err.value.code == 516 and "AUTHENTICATION_FAILED" in str(err.value)
    with pytest.raises(DatabaseError) as err:
        clickhouse_connect.get_client(host="127.0.0.1", port=server.port, username="nobody", password="secret")
    assert err.value.code == 516


def test_schema_errors_come_from_the_engine_or_the_fault_mode(server: ClickHouseHttp) -> None:
    """The server side of the schema-error scenario (the product's handling is tested elsewhere)."""
    client = server.client()
    try:
        client.command("CREATE DATABASE syncd")
        client.command("CREATE TABLE syncd.events (event_id UInt64, x String) ENGINE = MergeTree ORDER BY tuple()")
        # a real ALTER through the server: a raw Native insert naming the old column gets the engine's error
        block = client.raw_query("SELECT toUInt64(1) AS event_id, 'a' AS x", fmt="Native")
        client.command("ALTER TABLE syncd.events RENAME COLUMN event_id TO event_id_old")
        with pytest.raises(DatabaseError) as err:
            client.raw_insert("syncd.events", ["event_id", "x"], block, fmt="Native")
        assert err.value.code == 16 and "No such column event_id in table syncd.events" in str(err.value)
        # clickhouse-connect's insert() DESCRIBEs first and refuses client-side, without a code
        with pytest.raises(ProgrammingError, match="Unrecognized column 'event_id'"):
            client.insert("syncd.events", [[1, "a"]], column_names=["event_id", "x"])
        client.command("ALTER TABLE syncd.events RENAME COLUMN event_id_old TO event_id")
        client.insert("syncd.events", [[1, "a"]], column_names=["event_id", "x"])
        # the fault mode: DESCRIBE passes, the INSERT answers code 16 as a table altered in between would
        server.set_fault("schema")
        with pytest.raises(DatabaseError) as err:
            client.insert("syncd.events", [[2, "b"]], column_names=["event_id", "x"])
        assert err.value.code == 16 and "(NO_SUCH_COLUMN_IN_TABLE)" in str(err.value)
        server.set_fault("ok")
        client.insert("syncd.events", [[2, "b"]], column_names=["event_id", "x"])
        assert client.command("SELECT count() FROM syncd.events") == 2
    finally:
        client.close()
    stats = server.stats()
    assert stats["schema_errors"] == 2 and stats["errors"]["NO_SUCH_COLUMN_IN_TABLE"] == 2


# -- syncd on the http:// DSN ---------------------------------------------------------------------------------

def test_schema_apply_on_a_fresh_server(tmp_path: Path, server: ClickHouseHttp) -> None:
    cfg = _config(tmp_path, [], server)
    r = syncd("schema", "--config", str(cfg), "--apply")
    assert r.returncode == 0, r.stderr[-2000:]


def test_schema_apply_and_query(tmp_path: Path, server: ClickHouseHttp) -> None:
    cfg = _config(tmp_path, [], _with_database(server))
    first = syncd("schema", "--config", str(cfg), "--apply")
    assert first.returncode == 0, first.stderr[-2000:]
    versions = [m.version for m in migrations("syncd")]
    assert first.stdout.splitlines()[-1] == f"applied migrations: {versions}"  # after the migration log lines
    again = syncd("schema", "--config", str(cfg), "--apply")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines() == ["applied migrations: none (up to date)"]
    # the same tables, engines and columns as `syncd schema --apply` makes in the embedded engine
    shape = ("SELECT table, name, type FROM system.columns WHERE database = 'syncd' ORDER BY table, position",
             "SELECT name, engine FROM system.tables WHERE database = 'syncd' ORDER BY name")
    (tmp_path / "embedded").mkdir()
    embedded_cfg = write_config(tmp_path / "embedded", [])
    r = syncd("schema", "--config", str(embedded_cfg), "--apply")
    assert r.returncode == 0, r.stderr[-2000:]
    embedded = ch(tmp_path / "embedded" / "data", *shape)
    assert [[list(row) for row in rows] for rows in _q(server, *shape)] == embedded
    (done,) = _q(server, "SELECT version FROM syncd.schema_migrations ORDER BY version")
    assert [r[0] for r in done] == versions
    count = syncd("query", "--config", str(cfg), "SELECT count() FROM syncd.events")
    assert count.returncode == 0 and count.stdout == "0\n", count.stderr[-2000:]
    bad = syncd("query", "--config", str(cfg), "SELECT * FROM syncd.no_such_table")
    assert bad.returncode == 1 and "query failed" in bad.stderr and "code: 60" in bad.stderr
    assert "Traceback" not in bad.stderr and server.password not in bad.stdout + bad.stderr


def test_once_stores_ground_truth_then_adds_nothing(tmp_path: Path, server: ClickHouseHttp) -> None:
    sim = IotOpenSim(seed=41, installations=2, topics_per_installation=6, log_points=3000)
    with sims_in_thread([sim]):
        cfg = _config(tmp_path, [sim], _with_database(server))
        first = syncd("run", "--config", str(cfg), "--once")
        assert first.returncode == 0, first.stderr[-3000:]
        after_first = _counts(server)
        second = syncd("run", "--config", str(cfg), "--once")
        assert second.returncode == 0, second.stderr[-3000:]
    truth = truth_keys(sim)
    assert len(truth) == 3000 + 12
    assert after_first == (len(truth), len(truth), len(truth))
    assert _counts(server) == (len(truth), len(truth), len(truth))  # the second run added no row
    stored = _stored_keys(server, "iotopen")
    assert stored.keys() == truth.keys()
    for key in random.Random(41).sample(sorted(truth), 300):
        assert stored[key] == truth[key], key
    (status,) = _q(server, "SELECT count() FROM syncd.sync_status FINAL WHERE ok = 1")
    assert status == [(4,)]  # status + log for 2 installations
    assert server.stats()["inserts"] >= 2 and server.password not in first.stderr + second.stderr


# -- faults while a daemon runs -------------------------------------------------------------------------------

def _daemon(tmp: Path, sim: IotOpenSim, srv: ClickHouseHttp) -> tuple[subprocess.Popen[str], int, Path, Path]:
    port = free_port()
    cfg = _config(tmp, [sim], _with_database(srv), http_port=port, page_size=200)
    log = tmp / "daemon.log"
    with open(log, "w") as err:
        proc = popen_syncd("run", "--config", str(cfg), stderr=err)
    return proc, port, cfg, log


def _final_run_is_exact(cfg: Path, srv: ClickHouseHttp, sim: IotOpenSim, total: int) -> None:
    """A last `--once` after the daemon stopped: events FINAL == uniqExact == ground truth, keys equal."""
    final = syncd("run", "--config", str(cfg), "--once")
    assert final.returncode == 0, final.stderr[-3000:]
    final_count, uniq, _ = _counts(srv)
    assert final_count == uniq == total
    assert _stored_keys(srv, "iotopen").keys() == truth_keys(sim).keys()


def test_server_outage_mid_run_loses_and_doubles_nothing(tmp_path: Path, server: ClickHouseHttp) -> None:
    sim = IotOpenSim(seed=42, installations=2, topics_per_installation=5, log_points=12_000, history=600)
    total = 12_000 + 10
    with sims_in_thread([sim]):
        sim.faults.slow = 0.03  # the run takes a few seconds, so the server can go away in the middle of it
        proc, port, cfg, log = _daemon(tmp_path, sim, server)
        try:
            # some pages fetched and stored, not all
            wait_for(lambda: (m := metrics(port)) and _total(m, "syncd_sink_rows_total", sink="clickhouse") > 0
                     and _total(m, "syncd_events_total") < total)
            server.stop()
            down_at = time.monotonic()
            stored_before = _total(metrics(port), "syncd_sink_rows_total", sink="clickhouse")
            # the daemon keeps fetching; what it fetches waits in the spool while the sink fails
            wait_for(lambda: (m := metrics(port)) and _total(m, "syncd_events_total") == total
                     and _total(m, "syncd_sink_errors_total", sink="clickhouse") >= 1, timeout=60 + OUTAGE_S)
            m = metrics(port)
            assert _total(m, "syncd_sink_rows_total", sink="clickhouse") < total
            assert stored_before < total and m.get("syncd_spool_bytes", 0) > 0
            time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))  # the outage lasts OUTAGE_S, by definition
            server.start()
            wait_for(lambda: _total(metrics(port), "syncd_sink_rows_total", sink="clickhouse") >= total, timeout=90)
        finally:
            _stop_daemon(proc, log)
        _final_run_is_exact(cfg, server, sim, total)


def test_proxy_500s_then_recovery(tmp_path: Path, server: ClickHouseHttp) -> None:
    sim = IotOpenSim(seed=43, installations=2, topics_per_installation=5, log_points=8_000, history=600)
    total = 8_000 + 10
    with sims_in_thread([sim]):
        sim.faults.slow = 0.1  # 40 pages take 4 s or more: the sink has written some while the rest are being read
        proc, port, cfg, log = _daemon(tmp_path, sim, server)
        try:
            wait_for(lambda: (m := metrics(port)) and _total(m, "syncd_sink_rows_total", sink="clickhouse") > 0
                     and _total(m, "syncd_events_total") < total)
            server.set_fault("error500")
            # clickhouse-connect's insert() begins with DESCRIBE TABLE: each failed sink attempt is one of those
            wait_for(lambda: (s := server.stats()["error500"]["statements"]).get("DESCRIBE", 0)
                     + s.get("INSERT", 0) >= 4, timeout=60)
            errors_during = _total(metrics(port), "syncd_sink_errors_total", sink="clickhouse")
            assert errors_during >= 1
            server.set_fault("ok")
            wait_for(lambda: _total(metrics(port), "syncd_sink_rows_total", sink="clickhouse") >= total, timeout=90)
        finally:
            _stop_daemon(proc, log)
        _final_run_is_exact(cfg, server, sim, total)
    assert '"sink.failing"' in log.read_text() and '"sink.recovered"' in log.read_text()


def test_a_schema_error_stops_only_the_sink_and_it_resumes_when_the_table_is_fixed(
        tmp_path: Path, server: ClickHouseHttp) -> None:
    """The server answers every insert into events with NO_SUCH_COLUMN_IN_TABLE (a table changed between the
    client's DESCRIBE and its INSERT): the sink stops, says so everywhere, the pollers go on into the spool,
    and when the table is right again the backlog arrives exactly."""
    sim = IotOpenSim(seed=44, installations=2, topics_per_installation=5, log_points=4_000, history=600)
    total = 4_000 + 10
    with sims_in_thread([sim]):
        sim.faults.slow = 0.03
        port, log = free_port(), tmp_path / "daemon.log"
        cfg = _config(tmp_path, [sim], _with_database(server), http_port=port, page_size=200)
        cfg.write_text(cfg.read_text().replace('batch_age = "200ms"', 'batch_age = "200ms"\nschema_recheck = "2s"'))
        server.set_fault("schema")
        with open(log, "w") as err:
            proc = popen_syncd("run", "--config", str(cfg), stderr=err)
        try:
            wait_for(lambda: metrics(port).get('syncd_sink_stopped{sink="clickhouse"}') == 1, timeout=60)
            ready = urllib.request.Request(f"http://127.0.0.1:{port}/readyz")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(ready, timeout=5)
            assert refused.value.code == 503 and b"sink clickhouse stopped: schema mismatch" in refused.value.read()
            # the pollers never wait for the stopped sink (the spool is far from full)
            wait_for(lambda: _total(metrics(port), "syncd_events_total") == total, timeout=120)
            assert _total(metrics(port), "syncd_sink_rows_total", sink="clickhouse") == 0
            sink = status_row(syncd_status(cfg).stdout, "sinks", sink="clickhouse")
            assert sink["state"] == "stopped" and sink["detail"].startswith("schema mismatch"), sink
            server.set_fault("ok")  # the operator fixed the table
            wait_for(lambda: _total(metrics(port), "syncd_sink_rows_total", sink="clickhouse") >= total, timeout=60)
            assert metrics(port).get('syncd_sink_stopped{sink="clickhouse"}') == 0
        finally:
            _stop_daemon(proc, log)
    text = log.read_text()
    assert text.count('"sink.stopped_schema_mismatch"') == 1 and text.count('"sink.recovered"') == 1
    assert "NO_SUCH_COLUMN_IN_TABLE" in text and logged(text, "sink.stopped_schema_mismatch", table="events")
    final_count, uniq, _ = _counts(server)
    assert final_count == uniq == total
