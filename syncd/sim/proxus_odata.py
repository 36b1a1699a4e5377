"""The Proxus simulator's OData `$filter` parser (split out of syncd.sim.proxus)."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from syncd.sim.proxus_sql import Cond, Parser

ODATA_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


class ODataError(Exception):
    """An OData query option the server refuses (rendered as 400 {"error": {"code", "message"}})."""


_OD_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?"
                       r"(?:Z|[+-]\d{2}:\d{2}))|(?P<num>-?\d+(?:\.\d+)?)|(?P<word>[A-Za-z_]\w*)|(?P<op>[()]))")


class ODataFilter(Parser):
    """`$filter` with eq/ne/gt/ge/lt/le, and/or and parentheses (no functions), type-checked per property."""

    error = ODataError
    AND, OR = "and", "or"
    fold_case = False

    def __init__(self, text: str, props: dict[str, type]) -> None:
        toks, pos = [], 0
        while pos < len(text.rstrip()):
            m = _OD_TOKEN.match(text, pos)
            if not m:
                raise ODataError(f"Syntax error at position {pos} in '{text}'.")
            toks.append((m.lastgroup or "", m.group(m.lastgroup or "")))
            pos = m.end()
        super().__init__(toks)
        self.props = props
        self.pred = self.disjunction()[0]
        if self.peek()[0] != "eof":
            raise ODataError(f"Syntax error near '{self.peek()[1]}'.")

    def atom(self) -> Cond:
        if self.accept("("):
            cond = self.disjunction()
            self.expect(")")
            return cond
        kind, prop = self.take()
        if kind != "word" or self.peek() == ("op", "("):
            raise ODataError(f"Unsupported expression or function '{prop}'.")
        if prop not in self.props:
            raise ODataError(f"Could not find a property named '{prop}' on type 'Proxus.Model'.")
        op_name = self.take()[1]
        if op_name not in ODATA_OPS:
            raise ODataError(f"Unsupported operator '{op_name}'.")
        fn, want = ODATA_OPS[op_name], self.literal()
        if want is None and op_name in ("eq", "ne"):
            return lambda e: fn(e[prop], None), None, None
        ok = {bool: (bool,), int: (int, float), float: (int, float)}.get(self.props[prop], (self.props[prop],))
        if type(want) not in ok:
            raise ODataError(f"A binary operator with incompatible types was detected for property '{prop}'.")
        return lambda e: e[prop] is not None and fn(e[prop], want), None, None

    def literal(self) -> Any:
        kind, t = self.take()
        if kind == "str":
            return t[1:-1].replace("''", "'")
        if kind == "num":
            return float(t) if "." in t else int(t)
        if kind == "dt":
            return datetime.fromisoformat(t.replace("Z", "+00:00"))
        if kind == "word" and t in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[t]
        raise ODataError(f"Expected a literal at '{t}'.")
