"""Command line: syncd run | demo | check | status | backfill | schema | query | sim."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from syncd.errors import ConfigError
from syncd.observability import configure_logging
from syncd.settings import Settings, load

log = structlog.get_logger("syncd.cli")


# chdb depends on pyarrow, pandas and numpy for its DataFrame API, and chdb and clickhouse-connect import them
# whenever they are installed; syncd inserts lists and reads rows, so the program never needs them. Marked absent
# before anything imports them, they cost nothing: about 120 MB less RSS and 0.2 s less start-up for the
# process (measured). Only the program does this: a process importing syncd as a library keeps its modules.
UNUSED_MODULES = ("pyarrow", "pandas", "numpy")


def main(argv: list[str] | None = None) -> int:
    for name in UNUSED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    parser = argparse.ArgumentParser(prog="syncd", description="Keep your own ClickHouse and MQTT in step with vendor IoT clouds.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--once", action="store_true", help="sync every stream until caught up, drain the sinks, exit")

    p = sub.add_parser("demo", help="simulators + daemon + embedded ClickHouse in one process")
    p.add_argument("--duration", type=float, default=20.0, help="seconds to run (default 20)")
    p.add_argument("--data-dir", default="./data/demo")
    p.add_argument("--mqtt", default="", help="publish to this broker too, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--seed", type=int, default=1)

    p = sub.add_parser("check", help="validate a configuration; exit 2 listing every problem")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--discover", action="store_true",
                   help="also discover every source's streams (calls the vendors) to check the request budget")

    p = sub.add_parser("status", help="streams, sinks and sources as tables: the state file, and the daemon's /metrics when it answers")
    p.add_argument("--config", "-c")

    p = sub.add_parser("backfill", help="fill a past range of a source's history (live cursors untouched; resumable)")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--source", "-s", required=True, help="the [[sources]] name")
    p.add_argument("--stream", default="*", help="stream name glob, or a kind: 'log/10', 'log' (default: every history stream)")
    p.add_argument("--since", required=True, help="ISO date or date-time (UTC unless it says), or a duration back: 7d, 36h")
    p.add_argument("--until", default=None, help="the same forms (default: now); the range is [since, until)")
    p.add_argument("--live-share", type=float, default=0.5, metavar="FRACTION",
                   help="share of the source's rate kept for live polling (default 0.5): the backfill takes the rest")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")

    p = sub.add_parser("schema", help="print (or apply) the ClickHouse DDL")
    p.add_argument("--config", "-c")
    p.add_argument("--apply", action="store_true")

    p = sub.add_parser("query", help="run SQL on the configured store, TSV output")
    p.add_argument("--config", "-c")
    p.add_argument("sql")

    p = sub.add_parser("sim", help="serve the vendor simulators")
    p.add_argument("--vendors", default="all", help="comma list (default all)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="first port (0: free ports)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--live", action="store_true", help="keep generating new data")
    p.add_argument("--write-config", default="", help="write a syncd config pointing at the simulators")
    p.add_argument("--option", action="append", default=[], metavar="VENDOR.KEY=VALUE",
                   help="simulator option, e.g. iotopen.log_points=200000")

    args = parser.parse_args(argv)
    try:
        return int(_dispatch(args) or 0)
    except ConfigError as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check":
        return _check(args.config, args.discover)
    if args.command == "run":
        settings = load(args.config)
        configure_logging(settings.syncd.log_format, settings.secrets())
        from syncd.app import run
        from syncd.checks import warnings

        for line in warnings(settings, args.config):
            log.warning("config.warning", warning=line)

        return asyncio.run(run(settings, once=args.once))
    if args.command == "demo":
        import logging

        configure_logging("console" if sys.stderr.isatty() else "json", level=logging.WARNING)  # progress is on stdout
        from syncd.demo import demo

        return asyncio.run(demo(Path(args.data_dir), args.duration, mqtt_url=args.mqtt, seed=args.seed))
    if args.command == "backfill":
        import logging

        settings = load(args.config)
        configure_logging(settings.syncd.log_format, settings.secrets(), level=logging.WARNING)  # the bars tell progress
        from syncd.backfill import run_backfill

        return run_backfill(settings, args.source, args.stream, args.since, args.until,
                            progress=not args.no_progress, live_share=args.live_share)
    if args.command == "schema":
        return _schema(load(args.config), args.apply)
    if args.command == "query":
        return _query(load(args.config), args.sql)
    if args.command == "status":
        from syncd.status import render_status

        return render_status(load(args.config))
    if args.command == "sim":
        configure_logging("console" if sys.stderr.isatty() else "json")
        from syncd.sim.server import serve

        return asyncio.run(serve(args))
    return 2


def _check(path: str, discover: bool = False) -> int:
    try:
        settings = load(path)
    except ConfigError as err:
        for line in err.problems:
            print(line)
        print(f"{len(err.problems)} problem(s) in {path}")
        return 2
    import logging

    from syncd.checks import budget_warnings, discovered_streams, network_warnings, spooled_streams, warnings

    configure_logging(settings.syncd.log_format, settings.secrets(), level=logging.WARNING)  # stderr, not the report
    lines = warnings(settings, path) + asyncio.run(network_warnings(settings))
    if discover:
        counts, failed = asyncio.run(discovered_streams(settings))
        lines += failed + budget_warnings(settings, counts, "discovered")
    else:
        lines += budget_warnings(settings, spooled_streams(settings), "with a cursor in the state file")
    for line in lines:
        print(f"warning: {line}")
    print(f"{path}: OK ({len(settings.sources)} source(s), mqtt {'on' if settings.mqtt else 'off'})")
    return 0


def _schema(settings: Settings, apply: bool) -> int:
    from syncd.sinks.schema import ddl_script

    ch = settings.clickhouse
    if not apply:
        sys.stdout.write(ddl_script(ch.database, ch.cluster, ch.ttl))
        return 0
    from syncd.sinks.clickhouse import ClickHouseSink, StoreLocked

    sink = ClickHouseSink(settings.clickhouse_dsn, ch.database, cluster=ch.cluster, ttl=ch.ttl)
    try:
        applied = sink.open_sync()
    except StoreLocked as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        sink.close_sync()
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def _query(settings: Settings, sql: str) -> int:
    from syncd.sinks.clickhouse import StoreLocked, connect

    try:
        client = connect(settings.clickhouse_dsn, settings.clickhouse.database)
    except StoreLocked as err:
        print(err, file=sys.stderr)
        return 1
    try:
        result = client.query(sql) if sql.lstrip().lower().startswith(("select", "with", "show", "describe", "desc ", "exists")) else None
        if result is None:
            out = client.command(sql)
            if isinstance(out, str | int | float) and out != "":  # DDL answers a summary object, nothing to print
                print(out)
            return 0
        for row in result.result_rows:
            print("\t".join(_tsv(v) for v in row))
        return 0
    except Exception as err:  # SQL errors are the user's to read, not a traceback
        print(f"query failed: {err}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _tsv(value: object) -> str:
    if value is None:
        return "\\N"
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
