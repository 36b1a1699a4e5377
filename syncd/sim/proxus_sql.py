"""The Proxus simulator's SQL guard and ClickHouse subset: a strict SELECT over DeviceRawData, parsed and compiled.

Split out of syncd.sim.proxus (the server); the grammar is in `Query`. `Parser` is the OR/AND layer the OData
`$filter` grammar (syncd.sim.proxus_odata) shares.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

COLUMNS = ("Time", "DeviceId", "DeviceName", "Key", "DataType", "NumericValue", "StringValue")
IDX = {c: i for i, c in enumerate(COLUMNS)}
COL_TYPE = {"Time": "time", "DeviceId": "num", "DeviceName": "str", "Key": "str", "DataType": "enum",
            "NumericValue": "num", "StringValue": "str"}
DATA_TYPES = {"Boolean": 1, "Int16": 2, "UInt16": 3, "Int32": 4, "UInt32": 5, "Int64": 6, "Float": 7,
              "Double": 8, "String": 9, "DateTime": 10}
DT_NAME = {v: k for k, v in DATA_TYPES.items()}
UNITS_MS = {"SECOND": 1000, "MINUTE": 60_000, "HOUR": 3_600_000, "DAY": 86_400_000, "WEEK": 604_800_000}
CMP: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "==": operator.eq, "!=": operator.ne, "<>": operator.ne, "<": operator.lt, ">": operator.gt,
    "<=": operator.le, ">=": operator.ge}
KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "IN", "ORDER", "BY", "ASC", "DESC", "LIMIT", "INTERVAL"}
Row = tuple[int, int, str, str, int, float, str]
Cond = tuple[Callable[[Any], bool], int | None, int | None]  # predicate, Time lower/upper bound (ms)


class SqlError(Exception):
    """A statement the telemetry guard or ClickHouse refuses (rendered as 400 {"error": ...})."""


_TOKEN = re.compile(r"""\s*(?:
   (?P<comment>--|/\*|\#)
  |(?P<str>'(?:[^'\\]|''|\\.)*')
  |(?P<qid>`[^`]*`|"[^"]*")
  |(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  |(?P<word>[A-Za-z_][A-Za-z0-9_]*)
  |(?P<op><=|>=|!=|<>|==|[=<>(),*;.+-])
)""", re.X | re.S)
_DT = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?)?")


def _unquote(lit: str) -> str:
    def esc(m: re.Match[str]) -> str:
        if m.group(0) == "''":
            return "'"
        if m.group(1) in "\\'":
            return m.group(1)
        raise SqlError(f"Unsupported escape sequence \\{m.group(1)} in string literal")
    return re.sub(r"''|\\(.)", esc, lit[1:-1], flags=re.S)


def _parse_dt(text: str, scale: int = 3) -> int:
    m = _DT.fullmatch(text)
    try:
        if not m:
            raise ValueError
        y, mo, d, h, mi, s, frac = m.groups()
        dt = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0), tzinfo=UTC)
    except ValueError:
        raise SqlError(f"Cannot parse string '{text}' as DateTime64(3)") from None
    return int(dt.timestamp()) * 1000 + int((frac or "")[: min(scale, 3)].ljust(3, "0"))


def tokenize(text: str) -> list[tuple[str, str]]:
    """Split a statement into (kind, text) tokens; comments and unbalanced quotes are refused here."""
    text, pos, out = text.strip(), 0, []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            rest = text[pos:].lstrip()
            what = "unbalanced quote" if rest[:1] in "'`\"" else f"unexpected {rest[:12]!r}"
            raise SqlError(f"Syntax error: {what}")
        kind = m.lastgroup or ""
        if kind == "comment":
            raise SqlError("Comments are not allowed")
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Parser:
    """Token cursor plus the OR/AND layer shared by the SQL WHERE and the OData $filter grammars."""

    error: type[Exception] = SqlError
    AND, OR = "AND", "OR"
    fold_case = True  # SQL keywords are case-insensitive, OData's `and`/`or` are not

    def __init__(self, toks: list[tuple[str, str]]) -> None:
        self.toks, self.i = toks, 0

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        j = self.i + ahead
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "eof":
            raise self.error("Syntax error: unexpected end of expression")
        self.i += 1
        return tok

    def accept(self, text: str, kind: str = "op") -> bool:
        k, t = self.peek()
        if k == kind and (t.upper() if kind == "word" and self.fold_case else t) == text:
            self.i += 1
            return True
        return False

    def expect(self, text: str, kind: str = "op") -> None:
        if not self.accept(text, kind):
            raise self.error(f"Syntax error: expected {text!r} near {self.peek()[1]!r}")

    def listof(self, item: Callable[[], Any]) -> list[Any]:
        out = [item()]
        while self.accept(","):
            out.append(item())
        return out

    def disjunction(self) -> Cond:
        return self.junction(self.OR, lambda: self.junction(self.AND, self.atom))

    def junction(self, word: str, item: Callable[[], Cond]) -> Cond:
        parts = [item()]
        while self.accept(word, "word"):
            parts.append(item())
        if len(parts) == 1:
            return parts[0]
        preds, los, his = zip(*parts, strict=True)
        if word == self.AND:  # Time bounds: AND narrows, OR widens (unbounded if any side is)
            lo = max((x for x in los if x is not None), default=None)
            hi = min((x for x in his if x is not None), default=None)
            return lambda r: all(p(r) for p in preds), lo, hi
        lo = None if None in los else min(los)
        hi = None if None in his else max(his)
        return lambda r: any(p(r) for p in preds), lo, hi

    def atom(self) -> Cond:
        raise NotImplementedError


class Query(Parser):
    """One parsed SELECT, compiled to a row predicate plus Time bounds (so a page never scans the whole table).

    query  := SELECT ('*' | count() | count(*) | col {, col}) FROM [proxus.]DeviceRawData
              [WHERE or] [ORDER BY col [ASC|DESC] {, ...}] [LIMIT int] [';']
    or     := and {OR and};  and := atom {AND atom}
    atom   := '(' or ')' | col op value | col IN '(' value {, value} ')'
              | '(' col {, col} ')' op '(' value {, value} ')'
    op     := = | == | != | <> | < | > | <= | >=
    value  := 'str' ('' or \' escapes) | [-]number | now() | toDateTime64('YYYY-MM-DD hh:mm:ss[.fff]', n[, 'UTC'])
              followed by any number of (+|-) INTERVAL n SECOND|MINUTE|HOUR|DAY|WEEK (datetimes only)
    Columns are case-sensitive, `quoted` or "quoted"; keywords, now and count are not.

    `strict` is a stricter SQL injection guard (a Proxus server may have one: its rules are undocumented [S]): no
    OR, no IN, no tuple comparison. What stays is what the brief's own query uses (brief §2.3, §7.8).
    """

    def __init__(self, text: str, now_ms: int, strict: bool = False) -> None:
        super().__init__(tokenize(text))
        self.now_ms, self.strict = now_ms, strict
        if strict:
            word = next((t.upper() for k, t in self.toks if k == "word" and t.upper() in ("OR", "IN")), None)
            if word:
                raise SqlError(f"Query blocked by SQL injection protection: {word} is not allowed")
        if not self.accept("SELECT", "word"):
            raise SqlError("Only SELECT queries are allowed")
        if ("op", ";") in self.toks[:-1]:
            raise SqlError("Multiple statements are not allowed")
        if self.toks[-1] == ("op", ";"):
            self.toks.pop()
        self.pred: Callable[[Row], bool] = lambda r: True
        self.lo: int | None = None
        self.hi: int | None = None
        self.order: list[tuple[str, bool]] = []
        self.limit: int | None = None
        self.count = self.peek()[1].lower() == "count" and self.peek(1) == ("op", "(")
        if self.count:
            self.i += 2
            self.accept("*")
            self.expect(")")
        self.cols = [] if self.count else list(COLUMNS) if self.accept("*") else self.listof(self.column)
        self.expect("FROM", "word")
        table = self.take()[1] + (f".{self.take()[1]}" if self.accept(".") else "")
        if table.replace("`", "") not in ("DeviceRawData", "proxus.DeviceRawData"):
            raise SqlError(f"Table {table} is not allowed")
        if self.accept("WHERE", "word"):
            self.pred, self.lo, self.hi = self.disjunction()
        if self.accept("ORDER", "word"):
            self.expect("BY", "word")
            self.order = self.listof(self.order_item)
            if self.count:
                raise SqlError(f"Column {self.order[0][0]} is not under aggregate function")
        if self.accept("LIMIT", "word"):
            kind, text = self.take()
            if kind != "num" or not text.isdigit():
                raise SqlError(f"Syntax error: LIMIT needs a non-negative integer, got {text!r}")
            self.limit = int(text)
        if self.peek()[0] != "eof":
            raise SqlError(f"Syntax error: unexpected {self.peek()[1]!r}")

    def is_column(self, ahead: int = 0) -> bool:
        kind, text = self.peek(ahead)
        return kind == "qid" or (kind == "word" and text.upper() not in KEYWORDS)

    def column(self) -> str:
        if not self.is_column():
            raise SqlError(f"Syntax error: expected a column near {self.peek()[1]!r}")
        kind, text = self.take()
        name = text[1:-1] if kind == "qid" else text
        if self.peek() == ("op", "("):
            raise SqlError(f"Function {name} is not allowed")
        if name not in IDX:  # ClickHouse identifiers are case-sensitive
            raise SqlError(f"Unknown expression identifier '{name}'")
        return name

    def order_item(self) -> tuple[str, bool]:
        col = self.column()
        if self.accept("DESC", "word"):
            return col, True
        self.accept("ASC", "word")
        return col, False

    def atom(self) -> Cond:
        if self.peek() == ("op", "(") and not (self.is_column(1) and (self.peek(2) == ("op", ",") or (
                self.peek(2) == ("op", ")") and self.peek(3)[1] in CMP))):
            self.i += 1
            cond = self.disjunction()
            self.expect(")")
            return cond
        if self.accept("("):  # tuple comparison, e.g. (Time, DeviceId, Key) > ('...', 3, 'k')
            if self.strict:
                raise SqlError("Query blocked by SQL injection protection: tuple comparisons are not allowed")
            cols = self.listof(self.column)
            self.expect(")")
            fn, sym = self.cmp_op()
            self.expect("(")
            vals = self.listof(self.value)
            self.expect(")")
            if len(vals) != len(cols):
                raise SqlError("Tuple sizes differ in comparison")
            idx = [IDX[c] for c in cols]
            want = tuple(self.coerce(c, v) for c, v in zip(cols, vals, strict=True))
            lo, hi = self.bounds(sym, want[0]) if cols[0] == "Time" else (None, None)  # scan bounds are inclusive
            return lambda r: fn(tuple(r[i] for i in idx), want), lo, hi
        col = self.column()
        i = IDX[col]
        if self.accept("IN", "word"):
            self.expect("(")
            vals = [self.coerce(col, v) for v in self.listof(self.value)]
            self.expect(")")
            members = set(vals)
            return lambda r: r[i] in members, *((min(vals), max(vals)) if col == "Time" else (None, None))
        fn, sym = self.cmp_op()
        want = self.coerce(col, self.value())
        lo, hi = self.bounds(sym, want) if col == "Time" else (None, None)
        return lambda r: fn(r[i], want), lo, hi

    @staticmethod
    def bounds(sym: str, v: Any) -> tuple[int | None, int | None]:
        return {">": (v, None), ">=": (v, None), "<": (None, v), "<=": (None, v), "=": (v, v),
                "==": (v, v)}.get(sym, (None, None))

    def cmp_op(self) -> tuple[Callable[[Any, Any], bool], str]:
        kind, text = self.take()
        if kind != "op" or text not in CMP:
            raise SqlError(f"Syntax error: expected a comparison, got {text!r}")
        return CMP[text], text

    def value(self) -> tuple[str, Any]:
        kind, text = self.take()
        if kind == "str":
            return "str", _unquote(text)
        if kind == "op" and text == "-" and self.peek()[0] == "num":
            return "num", -float(self.take()[1])
        if kind == "num":
            return "num", int(text) if text.isdigit() else float(text)
        if kind != "word" or not self.accept("("):
            raise SqlError(f"Syntax error: expected a literal, got {text!r}")
        if text.lower() == "now":
            ms = self.now_ms // 1000 * 1000  # now() is a DateTime: whole seconds
        elif text == "toDateTime64":
            lit = self.take()
            self.expect(",")
            scale = self.take()
            if lit[0] != "str" or scale[0] != "num" or not scale[1].isdigit() or int(scale[1]) > 9:
                raise SqlError("toDateTime64 expects ('YYYY-MM-DD hh:mm:ss.fff', scale)")
            if self.accept(",") and self.take() != ("str", "'UTC'"):
                raise SqlError("toDateTime64: only the 'UTC' time zone is supported")
            ms = _parse_dt(_unquote(lit[1]), int(scale[1]))
        else:
            raise SqlError(f"Function {text} is not allowed")
        self.expect(")")
        while self.peek() in (("op", "-"), ("op", "+")) and self.peek(1)[1].upper() == "INTERVAL":
            sign = -1 if self.take()[1] == "-" else 1
            self.i += 1
            n, unit = self.take(), self.take()[1].upper()
            if n[0] != "num" or not n[1].isdigit() or unit not in UNITS_MS:
                raise SqlError("Syntax error: INTERVAL <n> SECOND|MINUTE|HOUR|DAY|WEEK")
            ms += sign * int(n[1]) * UNITS_MS[unit]
        return "dt", ms

    @staticmethod
    def coerce(col: str, val: tuple[str, Any]) -> Any:
        """Type-check a literal against a column the way ClickHouse would, once, before any row is read."""
        kind, x = val
        t = COL_TYPE[col]
        if t == "time" and kind in ("dt", "str"):
            return x if kind == "dt" else _parse_dt(x)
        if t == "num" and kind == "num" or t == "str" and kind == "str":
            return x
        if t == "num" and kind == "str":
            try:
                return float(x)
            except ValueError:
                raise SqlError(f"Cannot parse '{x}' as a number for {col}") from None
        if t == "enum" and kind in ("str", "num"):
            if kind == "str" and x in DATA_TYPES or kind == "num" and x in DT_NAME:
                return DATA_TYPES[x] if kind == "str" else int(x)
            raise SqlError(f"Unknown element '{x}' for enum DataType")
        raise SqlError(f"Illegal types: cannot compare {col} with {kind} {x!r}")
