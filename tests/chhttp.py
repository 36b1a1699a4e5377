"""A small ClickHouse HTTP server for the tests: ClickHouse's HTTP interface in front of the embedded engine.

No ClickHouse server can be installed here, so this speaks the part of ClickHouse's HTTP interface that
clickhouse-connect uses, and runs every statement on the embedded engine (chdb) for real:

- `GET /ping` answers `Ok.`; any other path takes a query, as ClickHouse's dynamic query handler does.
- The query is the `query` URL parameter, a newline and the request body (ClickHouse's own rule), the body
  decompressed first by its `Content-Encoding` (lz4 frames, zstd, gzip, deflate, br, xz, bz2) and read with
  Content-Length or chunked transfer encoding (a POST with neither answers 411, code 381).
- `database` and `default_format` parameters, `param_<name>` query parameters (`{name:Type}`), and every
  other non-reserved parameter as a setting, applied with SET on a fresh engine handle for that request only
  (an unknown setting answers the engine's own UNKNOWN_SETTING, 404). A GET runs with `readonly = 2`.
- `INSERT ... FORMAT <fmt>` (or `VALUES`) with data: the statement goes to the engine's streaming insert
  (`chdb` `send_insert`) and the data bytes are appended to it unchanged, so the engine parses the Native
  block clickhouse-connect built; `insert_deduplication_token` and friends apply as for a server (the
  tables use `non_replicated_deduplication_window`, so a retried insert really adds nothing).
- Other statements run with the format their FORMAT clause names (`Native` from clickhouse-connect), or
  `default_format`, or TabSeparated; the engine's output bytes are the body.
- Responses carry `X-ClickHouse-Server-Display-Name`, `X-ClickHouse-Query-Id`, `X-ClickHouse-Summary` and,
  for statements that produce a result, `X-ClickHouse-Format` and `X-ClickHouse-Timezone`. With
  `enable_http_compression` on (the parameter, else the engine's default, which is 1 in 26.x) and an
  `Accept-Encoding` header the body is compressed with the method ClickHouse
  would choose (zstd, br, lz4, snappy, gzip, deflate, xz, bz2 in that order of preference; the first one
  this process can produce).
- Errors: `Code: N. DB::Exception: ... (NAME) (version V)` and a newline, the `X-ClickHouse-Exception-Code`
  header, and the HTTP status ClickHouse maps the code to (exceptionCodeToHTTPStatus.cpp). Engine errors
  are the engine's own messages.
- Authentication: HTTP Basic, `X-ClickHouse-User`/`X-ClickHouse-Key` headers or `user`/`password`
  parameters (mixing them is refused, as ClickHouse does); anything but the configured user and password
  answers 516 AUTHENTICATION_FAILED with status 403.

Not served (deliberately; each answers an honest error or is documented here): sessions (`session_id` is
accepted but a SET or a temporary table does not outlive its request), `client_protocol_version` (chdb's
Native output has no block-info header, so the server ignores it like a proxy that strips it, and
clickhouse-connect's probe then falls back to protocol 0), `compress=1`/`decompress=1` (ClickHouse's
internal block compression: NOT_IMPLEMENTED), multipart external data (NOT_IMPLEMENTED), progress headers
(the whole result is buffered, as with `wait_end_of_query=1`), `FROM INFILE`/`INTO OUTFILE`
(refused as a server refuses them), br/snappy response compression when the module is missing.

Run it as its own process (chdb holds one engine per process): `python tests/chhttp.py --port P --path DIR
[--user default --password secret]`, or from a test with `ClickHouseHttp(path)` (`start()`, `stop()`
SIGTERM, `kill()` SIGKILL, `url`, `dsn`, `set_fault()`, `stats()`, `client()`).

Fault modes, switched while it runs with `POST /__fault?mode=M` (`ClickHouseHttp.set_fault(M)`); only the
tests call it, and `/__fault` and `/__stats` need no credentials:
- `ok`: normal service.
- `error500`: every request (`/ping` too) answers HTTP 500 with an nginx-style HTML body and no ClickHouse
  headers, like a broken proxy in front of the server. The server counts them in `/__stats`
  (`error500.requests`, `error500.statements` by first keyword: a clickhouse-connect `insert()` without
  column types first sends `DESCRIBE TABLE`, so a failing sink insert shows up as DESCRIBE there).
- `schema`: an INSERT into a table named `events` answers, without touching the engine,
  `Code: 16. DB::Exception: No such column <last column of the INSERT> in table <db>.events (<uuid>).
  (NO_SUCH_COLUMN_IN_TABLE)` with header code 16 and status 500: the exact text the engine gives for an
  INSERT naming a column the table no longer has, i.e. what a server answers when the table is altered
  between clickhouse-connect's DESCRIBE and its INSERT. Everything else (DESCRIBE included) is served.

A schema error straight from the engine, no fault mode needed: alter the table through the server, e.g.
`client.command("ALTER TABLE syncd.events RENAME COLUMN event_id TO event_id_old")` (the column is neither
in the sorting key nor read by `latest_mv`; rename it back to repair). Then an INSERT naming `event_id`
(`client.raw_insert(...)`, or `client.insert(..., column_type_names=[...])` which skips the DESCRIBE)
gets the engine's `Code: 16 ... No such column event_id in table syncd.events (...)
(NO_SUCH_COLUMN_IN_TABLE)`, status 500, header 16. A plain `client.insert(..., column_names=...)` (what
syncd's sink does) DESCRIBEs first and raises clickhouse-connect's own `ProgrammingError("Unrecognized
column 'event_id' in table syncd.events")` before anything is sent, with no code.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import gzip
import json
import lzma
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

FAULT_MODES = ("ok", "error500", "schema")
KEEP_ALIVE_S = 10  # ClickHouse's keep_alive_timeout default

# Parameters ClickHouse's HTTP handler consumes itself; everything else not `param_*` is a setting.
RESERVED_PARAMS = {"query", "compress", "decompress", "user", "password", "quota_key", "query_id", "stacktrace",
                   "buffer_size", "wait_end_of_query", "session_id", "session_timeout", "session_check",
                   "client_protocol_version", "close_session", "database", "default_format", "role"}

# exceptionCodeToHTTPStatus.cpp, by error name.
_STATUS_BY_NAME = {
    **dict.fromkeys(["REQUIRED_PASSWORD"], 401),
    **dict.fromkeys(["UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE",
                     "ACCESS_DENIED"], 403),
    **dict.fromkeys(["BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
                     "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
                     "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6",
                     "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
                     "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST",
                     "TOO_BIG_AST", "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
                     "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"], 400),
    **dict.fromkeys(["UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
                     "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
                     "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE",
                     "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE"], 404),
    "QUERY_IS_TOO_LARGE": 413, "NOT_IMPLEMENTED": 501, "SOCKET_TIMEOUT": 503, "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411, "TIMEOUT_EXCEEDED": 408, "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

_RESULT_STATEMENTS = {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "("}
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE = re.compile(r"Code:\s*(\d+)")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")

PROXY_500 = (b"<html>\r\n<head><title>500 Internal Server Error</title></head>\r\n<body>\r\n"
             b"<center><h1>500 Internal Server Error</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


class ClickHouseError(Exception):
    """An error answered the ClickHouse way: code, name, message."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code, self.name, self.message = code, name, message

    @classmethod
    def from_engine(cls, text: str) -> ClickHouseError:
        """The engine's own exception text (chdb may prefix it, e.g. "Streaming insert finish failed: ")."""
        at = text.find("Code: ")
        message = (text[at:] if at >= 0 else text).strip()
        code = _CODE.search(message)
        names = _NAME.findall(message)
        if code is None:
            return cls(1001, "STD_EXCEPTION", f"Code: 1001. DB::Exception: {message}. (STD_EXCEPTION)")
        return cls(int(code.group(1)), names[-1] if names else "", message)

    def body(self, version: str) -> bytes:
        text = self.message if self.message.startswith("Code: ") else \
            f"Code: {self.code}. DB::Exception: {self.message}. ({self.name})"
        if "(version " not in text:
            text += f" (version {version} (official build))"
        return (text + "\n").encode()

    @property
    def status(self) -> int:
        return _STATUS_BY_NAME.get(self.name, 500)


# -- statements ---------------------------------------------------------------------------------------

@dataclass
class Token:
    kind: str  # word | quoted | string | punct
    start: int
    end: int
    text: str


def _lex(buf: bytes, pos: int = 0) -> Iterator[Token]:
    """ClickHouse SQL tokens, lazily (an INSERT's data after FORMAT is never lexed)."""
    n = len(buf)
    while pos < n:
        c = buf[pos]
        if c in b" \t\n\r\f\v":
            pos += 1
        elif buf.startswith(b"--", pos) or (c == 0x23 and buf[pos + 1:pos + 2] in (b" ", b"!")):  # -- or "# "
            end = buf.find(b"\n", pos)
            pos = n if end < 0 else end + 1
        elif buf.startswith(b"/*", pos):
            end = buf.find(b"*/", pos + 2)
            pos = n if end < 0 else end + 2
        elif c in b"'\"`":
            end = pos + 1
            while end < n:
                if buf[end] == 0x5C:  # backslash escape
                    end += 2
                    continue
                if buf[end] == c:
                    if end + 1 < n and buf[end + 1] == c:  # doubled quote
                        end += 2
                        continue
                    break
                end += 1
            end = min(end + 1, n)
            raw = buf[pos + 1:end - 1].decode("utf-8", "replace")
            unq = re.sub(r"\\(.)", r"\1", raw).replace(chr(c) * 2, chr(c))
            yield Token("string" if c == 0x27 else "quoted", pos, end, unq)
            pos = end
        elif chr(c).isalnum() or c in b"_$" or c >= 0x80:
            end = pos + 1
            while end < n and (chr(buf[end]).isalnum() or buf[end] in b"_$" or buf[end] >= 0x80):
                end += 1
            yield Token("word", pos, end, buf[pos:end].decode("utf-8", "replace"))
            pos = end
        else:
            yield Token("punct", pos, pos + 1, chr(c))
            pos += 1


@dataclass
class Statement:
    kind: str  # first keyword, upper case
    sql: str  # for the engine: the statement, without an INSERT's FORMAT clause and data
    insert_format: str | None = None  # set: an INSERT whose data follows
    data: bytes = b""
    table: str = ""  # an INSERT's target table, unqualified
    database: str = ""  # ... and its database when qualified
    columns: list[str] = field(default_factory=list)  # an INSERT's column list
    output_format: str | None = None  # a FORMAT clause of any other statement

    @property
    def produces_result(self) -> bool:
        return self.kind in _RESULT_STATEMENTS


def _syntax(message: str) -> ClickHouseError:
    return ClickHouseError(62, "SYNTAX_ERROR", f"Code: 62. DB::Exception: {message}. (SYNTAX_ERROR)")


def parse_statement(buf: bytes) -> Statement:
    """Split one statement from its data the way ClickHouse's parser does, without parsing all of it."""
    tokens = _lex(buf)
    first = next(tokens, None)
    if first is None:
        raise _syntax("Empty query")
    kind = first.text.upper() if first.kind == "word" else first.text
    if kind == "INSERT":
        return _parse_insert(buf, tokens)
    toks = [first, *tokens]
    depth, ends = 0, None
    for t in toks:
        if t.kind == "punct" and t.text == "(":
            depth += 1
        elif t.kind == "punct" and t.text == ")":
            depth -= 1
        elif t.kind == "punct" and t.text == ";" and depth == 0 and ends is None:
            ends = t
        elif ends is not None:
            raise _syntax("Multi-statements are not allowed")
    top = _top_level(toks)
    output_format = None
    for i, t in enumerate(top):
        if t.kind == "word" and t.text.upper() == "FORMAT" and i + 1 < len(top) and top[i + 1].kind in ("word", "quoted"):
            rest = top[i + 2:]
            if not rest or (rest[0].kind == "word" and rest[0].text.upper() == "SETTINGS") or rest[0].text == ";":
                output_format = top[i + 1].text
        if (t.kind == "word" and t.text.upper() == "INTO" and i + 1 < len(top)
                and top[i + 1].text.upper() == "OUTFILE"):
            raise ClickHouseError(358, "INTO_OUTFILE_NOT_ALLOWED",
                                  "Code: 358. DB::Exception: INTO OUTFILE is not allowed. (INTO_OUTFILE_NOT_ALLOWED)")
    return Statement(kind, buf.decode("utf-8", "replace"), output_format=output_format)


def _top_level(toks: list[Token]) -> list[Token]:
    out, depth = [], 0
    for t in toks:
        if t.kind == "punct" and t.text in "([":
            depth += 1
        elif t.kind == "punct" and t.text in ")]":
            depth -= 1
        elif depth == 0:
            out.append(t)
    return out


def _parse_insert(buf: bytes, tokens: Iterator[Token]) -> Statement:
    names: list[str] = []
    columns: list[str] = []
    t = next(tokens, None)
    function = False
    while t is not None and t.kind == "word" and t.text.upper() in ("INTO", "TABLE", "FUNCTION"):
        function = function or t.text.upper() == "FUNCTION"
        t = next(tokens, None)
    if t is not None and t.kind in ("word", "quoted"):  # [db.]table
        names.append(t.text)
        t = next(tokens, None)
        while t is not None and t.kind == "punct" and t.text == ".":
            t = next(tokens, None)
            if t is not None and t.kind in ("word", "quoted"):
                names.append(t.text)
                t = next(tokens, None)
    depth = 0
    if t is not None and t.kind == "punct" and t.text == "(":  # the column list (a table function's arguments)
        depth = 1
        t = next(tokens, None)
        while t is not None and depth:
            if t.kind == "punct" and t.text == "(":
                depth += 1
            elif t.kind == "punct" and t.text == ")":
                depth -= 1
            elif depth == 1 and t.kind in ("word", "quoted") and not function:
                columns.append(t.text)
            t = next(tokens, None)
    table, database = (names[-1] if names else ""), (names[-2] if len(names) > 1 else "")
    while t is not None:
        if t.kind == "punct" and t.text in "([":
            depth += 1
        elif t.kind == "punct" and t.text in ")]":
            depth -= 1
        elif depth == 0 and t.kind == "word":
            word = t.text.upper()
            if word == "INFILE":
                raise ClickHouseError(78, "UNKNOWN_TYPE_OF_QUERY", "Code: 78. DB::Exception: Query has infile and "
                                      "was send directly to server. (UNKNOWN_TYPE_OF_QUERY)")
            if word == "FORMAT":
                name = next(tokens, None)
                if name is None or name.kind not in ("word", "quoted"):
                    raise _syntax("Expected the name of a format after FORMAT")
                pos = name.end
                if buf[pos:pos + 1] == b";":
                    raise _syntax("You have excessive ';' symbol before data for INSERT")
                while pos < len(buf) and buf[pos] in b" \t\f":  # data starts after the first newline, if any
                    pos += 1
                if buf[pos:pos + 1] == b"\r":
                    pos += 1
                if buf[pos:pos + 1] == b"\n":
                    pos += 1
                return Statement("INSERT", buf[:t.start].decode("utf-8", "replace"), name.text, buf[pos:], table,
                                 database, columns)
            if word == "VALUES":
                return Statement("INSERT", buf[:t.start].decode("utf-8", "replace"), "Values", buf[t.end:], table,
                                 database, columns)
            if word in ("SELECT", "WITH"):
                break
        t = next(tokens, None)
    return Statement("INSERT", buf.decode("utf-8", "replace"), table=table, database=database, columns=columns)


# -- compression ----------------------------------------------------------------------------------------

def decompress(data: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if not encoding or encoding == "identity":
        return data
    if encoding == "lz4":  # a sequence of LZ4 frames (clickhouse-connect compresses each block as one frame)
        import lz4.frame

        out = bytearray()
        while data:
            d = lz4.frame.LZ4FrameDecompressor()
            out += d.decompress(data)
            data = d.unused_data if d.eof else b""
        return bytes(out)
    if encoding == "zstd":
        return _zstd().decompress(data)
    if encoding in ("gzip", "x-gzip"):
        return gzip.decompress(data)
    if encoding == "deflate":
        return zlib.decompress(data)
    if encoding == "xz":
        return lzma.decompress(data)
    if encoding in ("bz2", "bzip2"):
        return bz2.decompress(data)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]

        return brotli.decompress(data)  # type: ignore[no-any-return]
    raise ClickHouseError(48, "NOT_IMPLEMENTED",
                          f"Code: 48. DB::Exception: Content-Encoding '{encoding}' is not supported by this test "
                          "server. (NOT_IMPLEMENTED)")


def _zstd() -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    return zstd


def _can(method: str) -> bool:
    try:
        if method == "zstd":
            _zstd()
        elif method == "lz4":
            import lz4.frame  # noqa: F401
        elif method == "br":
            import brotli  # type: ignore[import-not-found]  # noqa: F401
        elif method == "snappy":
            return False
    except ImportError:
        return False
    return True


def choose_response_compression(accept: str) -> str | None:
    """chooseHTTPCompressionMethod: ClickHouse's order of preference, substring matches on the header."""
    for method in ("zstd", "br", "lz4", "snappy", "gzip", "deflate", "xz", "bz2"):
        if method in accept and _can(method):
            return method
    return None


def compress(data: bytes, method: str, level: int) -> bytes:
    if method == "zstd":
        return _zstd().compress(data)  # type: ignore[no-any-return]
    if method == "lz4":
        import lz4.frame

        return lz4.frame.compress(data)  # type: ignore[no-any-return]
    if method == "br":
        import brotli  # type: ignore[import-not-found]

        return brotli.compress(data)  # type: ignore[no-any-return]
    if method == "gzip":
        return gzip.compress(data, compresslevel=max(1, min(9, level)))
    if method == "deflate":
        return zlib.compress(data, max(1, min(9, level)))
    if method == "xz":
        return lzma.compress(data)
    return bz2.compress(data)


def _content_type(fmt: str | None) -> str:
    f = (fmt or "").lower()
    if f.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if f.startswith("csv"):
        return "text/csv; charset=UTF-8; header=absent"
    if f.startswith("json"):
        return "application/json; charset=UTF-8"
    if f in ("native", "arrow", "arrowstream", "parquet", "orc", "avro") or f.startswith("rowbinary"):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# -- the engine -------------------------------------------------------------------------------------------

@dataclass
class Request:
    statement: Statement
    settings: dict[str, str]
    query_params: dict[str, str]
    database: str
    default_format: str
    readonly: bool  # a GET


@dataclass
class Outcome:
    body: bytes
    summary: dict[str, str]
    result_format: str | None  # set for a statement that produces a result


class Engine:
    """The embedded engine, one statement at a time, each on a fresh handle (its own settings and database)."""

    def __init__(self, path: str) -> None:
        import chdb

        self._chdb = chdb
        self.path = path
        self.base = chdb.connect(path)  # keeps the engine up between requests
        self.lock = threading.Lock()
        self.closed = False
        out = self.base.query("SELECT version(), timezone(), getSetting('enable_http_compression'), "
                              "getSetting('http_zlib_compression_level')", "TabSeparated").bytes().decode()
        self.version, self.timezone, http_compression, zlib_level = out.rstrip("\n").split("\t")
        self.http_compression = http_compression.lower() in ("1", "true")  # its default differs by version
        self.zlib_level = int(zlib_level)

    def execute(self, req: Request, fault: str) -> Outcome:
        st = req.statement
        with self.lock:
            if self.closed:
                raise ClickHouseError(210, "NETWORK_ERROR", "Code: 210. DB::Exception: The server is shutting down. "
                                      "(NETWORK_ERROR)")
            conn = self._chdb.connect(self.path)
            try:
                return self._execute(conn, req, st, fault)
            except ClickHouseError:
                raise
            except Exception as err:  # the engine's exception text carries its code and name
                raise ClickHouseError.from_engine(str(err)) from err
            finally:
                conn.close()

    def _execute(self, conn: Any, req: Request, st: Statement, fault: str) -> Outcome:
        if req.readonly and conn.query("SELECT getSetting('readonly')", "TabSeparated").bytes().strip() == b"0":
            conn.query("SET readonly = 2")
        if req.database:
            conn.query(f"USE {_ident(req.database)}")
        for key, value in req.settings.items():
            if not _SETTING_NAME.match(key):
                raise ClickHouseError(115, "UNKNOWN_SETTING",
                                      f"Code: 115. DB::Exception: Unknown setting '{key}'. (UNKNOWN_SETTING)")
            conn.query(f"SET {key} = {_quote(value)}")
        if st.insert_format is not None:
            if fault == "schema" and st.table == "events":
                raise self._schema_error(conn, st)
            started = time.monotonic()
            inserter = conn.send_insert(st.sql, st.insert_format)
            try:
                for at in range(0, len(st.data), 1 << 22):
                    inserter.append(st.data[at:at + (1 << 22)])
                res = inserter.finish()
            except BaseException:
                try:
                    inserter.cancel()
                except Exception:  # noqa: BLE001 - the insert's own error is the one to answer
                    pass
                raise
            return Outcome(b"", {"read_rows": "0", "read_bytes": "0", "written_rows": str(res.rows_written),
                                 "written_bytes": str(res.bytes_written),
                                 "elapsed_ns": str(int((time.monotonic() - started) * 1e9))}, None)
        fmt = st.output_format or req.default_format or "TabSeparated"
        res = conn.query(st.sql, fmt, params=req.query_params or None)
        body = res.bytes() or b""
        written = res.rows_written() if callable(res.rows_written) else res.rows_written
        summary = {"read_rows": str(res.rows_read()), "read_bytes": str(res.bytes_read()),
                   "written_rows": str(written), "elapsed_ns": str(int(res.elapsed() * 1e9))}
        return Outcome(body, summary, fmt if st.produces_result else None)

    def _schema_error(self, conn: Any, st: Statement) -> ClickHouseError:
        database = st.database or conn.query("SELECT currentDatabase()", "TabSeparated").bytes().decode().strip()
        table_uuid = conn.query(f"SELECT uuid FROM system.tables WHERE database = {_quote(database)} "
                                f"AND name = {_quote(st.table)}", "TabSeparated").bytes().decode().strip()
        column = st.columns[-1] if st.columns else "event_id"
        return ClickHouseError(16, "NO_SUCH_COLUMN_IN_TABLE", f"Code: 16. DB::Exception: No such column {column} in "
                               f"table {database}.{st.table} ({table_uuid}). (NO_SUCH_COLUMN_IN_TABLE)")

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.base.close()


# -- HTTP -------------------------------------------------------------------------------------------------

class State:
    def __init__(self, engine: Engine, user: str, password: str, fault: str) -> None:
        self.engine, self.user, self.password = engine, user, password
        self.fault = fault
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.statements: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error500: Counter[str] = Counter()
        self.inserted_rows = 0
        self.display_name = socket.gethostname()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"mode": self.fault, "requests": self.counts["requests"], "statements": dict(self.statements),
                    "inserts": self.counts["inserts"], "inserted_rows": self.inserted_rows,
                    "errors": dict(self.errors), "schema_errors": self.counts["schema_errors"],
                    "error500": {"requests": self.counts["error500"], "statements": dict(self.error500)}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chhttp"
    timeout = KEEP_ALIVE_S
    state: State  # set on the subclass the server uses

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")
        sys.stderr.flush()

    # --

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        headers = getattr(self, "headers", None)
        enc_in = headers.get("Content-Encoding", "-") if headers is not None else "-"
        self.log_message('"%s" %s %s in=%s out=%s', self.requestline[:160], code, getattr(self, "_kind", ""), enc_in,
                         getattr(self, "_enc_out", "-"))

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self._enc_out = headers.get("Content-Encoding", "-")
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if not self.close_connection:
            self.send_header("Keep-Alive", f"timeout={KEEP_ALIVE_S}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, err: ClickHouseError, compression: str | None = None, level: int = 3) -> None:
        state = self.state
        with state.lock:
            state.errors[err.name or str(err.code)] += 1
        body = err.body(state.engine.version)
        headers = {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Server-Display-Name": state.display_name,
                   "X-ClickHouse-Exception-Code": str(err.code)}
        if compression:  # past authentication ClickHouse writes the exception into the compressed stream
            body = compress(body, compression, level)
            headers["Content-Encoding"] = compression
        self._reply(err.status, body, headers)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command == "POST":
                raise ClickHouseError(381, "HTTP_LENGTH_REQUIRED", "Code: 381. DB::Exception: The Transfer-Encoding "
                                      "is not chunked and there is no Content-Length header for POST request. "
                                      "(HTTP_LENGTH_REQUIRED)")
            return b""
        return self.rfile.read(int(length))

    def _handle(self, method: str) -> None:
        state = self.state
        self._kind, self._enc_out = "", "-"
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if url.path.startswith("/__"):
            self._read_body()
            self._control(url.path, params)
            return
        with state.lock:
            state.counts["requests"] += 1
        try:
            body = self._read_body()
        except ClickHouseError as err:
            self.close_connection = True
            self._error(err)
            return
        if state.fault == "error500":
            self._answer_500(params, body)
            return
        if state.engine.closed:  # shutting down: drop the connection unanswered, as a dying server does
            self.close_connection = True
            return
        if url.path in ("/ping", "/replicas_status") or (url.path == "/" and "query" not in params and not body):
            self._reply(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
            return
        try:
            self._authenticate(params)
        except ClickHouseError as err:
            self._error(err)
            return
        compression = None
        level = int(params.get("http_zlib_compression_level") or state.engine.zlib_level)
        enabled = params.get("enable_http_compression")
        if (enabled.lower() in ("1", "true")) if enabled is not None else state.engine.http_compression:
            compression = choose_response_compression(self.headers.get("Accept-Encoding", ""))
        try:
            outcome, st = self._query(method, params, body)
        except ClickHouseError as err:
            if err.code == 16:
                with state.lock:
                    state.counts["schema_errors"] += 1
            self._error(err, compression, level)
            return
        headers = {"Content-Type": _content_type(outcome.result_format),
                   "X-ClickHouse-Server-Display-Name": state.display_name,
                   "X-ClickHouse-Query-Id": params.get("query_id") or str(uuid.uuid4())}
        if outcome.result_format:
            headers["X-ClickHouse-Format"] = outcome.result_format
            headers["X-ClickHouse-Timezone"] = params.get("session_timezone") or state.engine.timezone
        headers["X-ClickHouse-Summary"] = json.dumps(outcome.summary, separators=(",", ":"))
        data = outcome.body
        if compression:
            data = compress(data, compression, level)
            headers["Content-Encoding"] = compression
        with state.lock:
            state.statements[st.kind] += 1
            if st.insert_format is not None:
                state.counts["inserts"] += 1
                state.inserted_rows += int(outcome.summary.get("written_rows", "0"))
        self._reply(200, data, headers)

    def _full_query(self, params: dict[str, str], body: bytes) -> bytes:
        if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "Code: 48. DB::Exception: External data (multipart/form-data) "
                                  "is not supported by this test server. (NOT_IMPLEMENTED)")
        if params.get("decompress", "0").lower() in ("1", "true"):
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "Code: 48. DB::Exception: decompress=1 (ClickHouse's internal "
                                  "block compression) is not supported by this test server. (NOT_IMPLEMENTED)")
        body = decompress(body, self.headers.get("Content-Encoding", ""))
        query = params.get("query", "")
        return (query.encode() + b"\n" if query else b"") + body

    def _query(self, method: str, params: dict[str, str], body: bytes) -> tuple[Outcome, Statement]:
        if params.get("compress", "0").lower() in ("1", "true"):
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "Code: 48. DB::Exception: compress=1 (ClickHouse's internal "
                                  "block compression) is not supported by this test server. (NOT_IMPLEMENTED)")
        st = parse_statement(self._full_query(params, body))
        self._kind = st.kind + (f" {st.database}.{st.table}" if st.table else "")
        settings = {k: v for k, v in params.items() if k not in RESERVED_PARAMS and not k.startswith("param_") and k}
        req = Request(st, settings, {k[6:]: v for k, v in params.items() if k.startswith("param_")},
                      self.headers.get("X-ClickHouse-Database") or params.get("database", ""),
                      self.headers.get("X-ClickHouse-Format") or params.get("default_format", ""), method == "GET")
        return self.state.engine.execute(req, self.state.fault), st

    def _authenticate(self, params: dict[str, str]) -> None:
        user = self.headers.get("X-ClickHouse-User", "")
        password = self.headers.get("X-ClickHouse-Key", "")
        by_headers = bool(user or password)
        auth = self.headers.get("Authorization", "")
        in_params = "user" in params or "password" in params

        def refuse(why: str) -> ClickHouseError:
            return ClickHouseError(516, "AUTHENTICATION_FAILED",
                                   f"Code: 516. DB::Exception: {why}. (AUTHENTICATION_FAILED)")

        if by_headers:
            if auth:
                raise refuse("Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers and "
                             "Authorization HTTP header simultaneously")
            if in_params:
                raise refuse("Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers and "
                              "authentication via parameters simultaneously")
        elif auth:
            if in_params:
                raise refuse("Invalid authentication: it is not allowed to use Authorization HTTP header and "
                             "authentication via parameters simultaneously")
            scheme, _, info = auth.partition(" ")
            if scheme.lower() != "basic":
                raise refuse(f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported")
            try:
                user, _, password = base64.b64decode(info.strip()).decode().partition(":")
            except ValueError as err:
                raise refuse("Invalid authentication: malformed Basic credentials") from err
        else:
            user, password = params.get("user", "default"), params.get("password", "")
        if user != self.state.user or password != self.state.password:
            raise refuse(f"{user}: Authentication failed: password is incorrect, or there is no user with such name")

    def _answer_500(self, params: dict[str, str], body: bytes) -> None:
        kind = "?"
        try:
            tok = next(_lex(self._full_query(params, body)), None)
            kind = tok.text.upper() if tok else "(empty)"
        except Exception:  # noqa: BLE001 - the proxy answers 500 whatever it was
            pass
        with self.state.lock:
            self.state.counts["error500"] += 1
            self.state.error500[kind] += 1
        self._reply(500, PROXY_500, {"Content-Type": "text/html", "Server": "nginx"})

    def _control(self, path: str, params: dict[str, str]) -> None:
        state = self.state
        if path == "/__fault":
            mode = params.get("mode", "")
            if mode not in FAULT_MODES:
                self._reply(400, f"mode must be one of {FAULT_MODES}\n".encode(), {"Content-Type": "text/plain"})
                return
            with state.lock:
                state.fault = mode
            self.log_message("fault mode now %s", mode)
        elif path != "/__stats":
            self._reply(404, b"no such control endpoint\n", {"Content-Type": "text/plain"})
            return
        self._reply(200, json.dumps(state.stats()).encode(), {"Content-Type": "application/json"})


def serve(host: str, port: int, path: str, user: str, password: str, fault: str = "ok") -> None:
    engine = Engine(path)
    state = State(engine, user, password, fault)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True

    def on_term(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sys.stderr.write(f"chhttp: serving {path} on http://{host}:{server.server_address[1]} "
                     f"(engine {engine.version}, pid {os.getpid()})\n")
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        engine.close()  # waits for the statement in flight
        sys.stderr.write("chhttp: stopped\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True, help="the engine's data directory")
    p.add_argument("--user", default="default")
    p.add_argument("--password", default="secret")
    p.add_argument("--fault", default="ok", choices=FAULT_MODES)
    args = p.parse_args(argv)
    serve(args.host, args.port, str(Path(args.path).resolve()), args.user, args.password, args.fault)
    return 0


# -- the tests' handle on it ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ClickHouseHttp:
    """The server as a subprocess on a fixed port and data path, so it can be stopped and started again."""

    def __init__(self, path: Path, *, port: int | None = None, user: str = "default", password: str = "secret",
                 database: str = "syncd") -> None:
        self.path = Path(path)
        self.port = port or _free_port()
        self.user, self.password, self.database = user, password, database
        self.log = self.path.parent / f"{self.path.name}.chhttp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        """`http://user:pass@127.0.0.1:PORT`, no database (syncd takes it from `[clickhouse] database`)."""
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.dsn}/{self.database}"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ClickHouseHttp:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--port", str(self.port),
                                          "--path", str(self.path), "--user", self.user, "--password", self.password],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chhttp exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/ping", timeout=2) as r:
                    if r.status == 200 and r.read() == b"Ok.\n":
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"chhttp did not answer /ping within {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _control(self, path: str, method: str = "GET") -> dict[str, Any]:
        req = urllib.request.Request(f"{self.base}{path}", method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def set_fault(self, mode: str) -> dict[str, Any]:
        return self._control(f"/__fault?mode={mode}", "POST")

    def stats(self) -> dict[str, Any]:
        return self._control("/__stats")

    def client(self, database: str | None = None, **kw: Any) -> Any:
        import clickhouse_connect

        return clickhouse_connect.get_client(host="127.0.0.1", port=self.port, username=self.user,
                                             password=self.password, database=database or "", **kw)

    def __enter__(self) -> ClickHouseHttp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
