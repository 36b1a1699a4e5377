"""The IXON simulator's request languages (split out of syncd.sim.ixon): a list's `fields`, `filters` and
keyset paging, and a DataList request with its queries.

Every refusal is an ApiError, which the simulator renders as the IXON error envelope.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

from syncd.sim.common import dumps

MAX_LIMIT = 5000
AGGS = {"count", "mean", "median", "mode", "spread", "sum", "first", "last", "max", "min", "raw"}
OPS = {"lt", "lte", "eq", "ne", "gt", "gte", "in", "ni", "isnull", "isnotnull", "between", "contains"}
ALIASES = {"less": "lt", "lessOrEqual": "lte", "equals": "eq", "differs": "ne", "greater": "gt",
           "greaterOrEqual": "gte"}
DATE_RE = re.compile(r"\d{4}-\d\d-\d\dT")
FILTER_RE = re.compile(r'\s*(\w+)\(\s*([\w.]+)((?:\s*,\s*(?:"(?:[^"\\]|\\.)*"|[^,()"]+))*)\s*\)\s*(?:,|$)')
ARG_RE = re.compile(r'\s*,\s*("(?:[^"\\]|\\.)*"|[^,()"]+)')
CURSOR_PREFIX = b"\xfb\xff\xbf"  # encodes to "+/+/": cursors only survive proper URL encoding
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}

Filter = tuple[str, str, list[Any]]  # (op, dotted field path, literal arguments)
T = TypeVar("T")


class HasObj(Protocol):
    """A tag as the simulator holds it: `obj` is its DataTag object."""

    obj: dict[str, Any]


TagT = TypeVar("TagT", bound=HasObj)


class ApiError(Exception):
    """A refusal: HTTP status, message, and the propertyName / listIndex it names."""

    def __init__(self, status: int, message: str, prop: str | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.prop, self.index = status, message, prop, index


# -- lists -------------------------------------------------------------------------------------
def list_page(q: Mapping[str, str], kind: str, items: list[dict[str, Any]], key: Callable[[Any], Any],
              size: int, max_size: int) -> tuple[list[Any], str | None]:
    """Filter, then keyset-page on `key` (cursor = opaque base64 of the last key), then select fields."""
    filters = parse_filters(q["filters"], SCHEMAS[kind]) if "filters" in q else []
    items = [o for o in items if matches(o, filters)]
    if "page-size" in q:
        size = _int(q["page-size"], "page-size")
        if size < 1:
            raise ApiError(400, "page-size must be at least 1", "page-size")
        size = min(size, max_size)
    first = 0
    if "page-after" in q:
        try:
            raw = base64.b64decode(q["page-after"], validate=True)
            if not raw.startswith(CURSOR_PREFIX):
                raise ValueError
            first = bisect.bisect_right([key(o) for o in items], json.loads(raw[len(CURSOR_PREFIX):]))
        except (binascii.Error, ValueError, TypeError):
            raise ApiError(400, "Invalid page-after cursor", "page-after") from None
    page = items[first:first + size]
    more = None
    if first + size < len(items):
        more = base64.b64encode(CURSOR_PREFIX + dumps(key(page[-1])).encode()).decode()
    spec = field_spec(q.get("fields"), kind)
    return [project(o, spec, SCHEMAS[kind]) for o in page], more


def _int(text: str, prop: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"{prop} must be an integer", prop) from None


# -- fields ------------------------------------------------------------------------------------
def parse_fields(text: str) -> dict[str, Any]:
    """`a,b.c,d(e,f.g),*` -> nested dict {name: subspec or None}; bad syntax -> 400."""
    tokens = re.findall(r"[\w*]+|\S", text) + [""]  # "" marks the end
    spec, pos = _field_list(tokens, 0)
    if tokens[pos]:
        raise ApiError(400, "Malformed fields parameter", "fields")
    return spec


def _field_list(tokens: list[str], pos: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while True:
        name, sub, pos = _field_item(tokens, pos)
        _merge(out, name, sub)
        if tokens[pos] != ",":
            return out, pos
        pos += 1


def _field_item(tokens: list[str], pos: int) -> tuple[str, Any, int]:
    """One `name`, `name.item` (= name(item)) or `name(list)`."""
    if not re.fullmatch(r"[\w*]+", tokens[pos]):
        raise ApiError(400, "Malformed fields parameter", "fields")
    name, pos = tokens[pos], pos + 1
    if tokens[pos] == ".":
        inner, sub, pos = _field_item(tokens, pos + 1)
        return name, {inner: sub}, pos
    if tokens[pos] != "(":
        return name, None, pos
    sub, pos = _field_list(tokens, pos + 1)
    if tokens[pos] != ")":
        raise ApiError(400, "Malformed fields parameter", "fields")
    return name, sub, pos + 1


def _merge(out: dict[str, Any], name: str, sub: Any) -> None:
    if isinstance(out.get(name), dict) and isinstance(sub, dict):
        for k, v in sub.items():
            _merge(out[name], k, v)
    elif sub is not None or name not in out:
        out[name] = sub


def _check(spec: dict[str, Any], schema: dict[str, Any], path: str = "") -> None:
    for name, sub in spec.items():
        if name == "*" and sub is None:
            continue
        if name not in schema or (sub is not None and schema[name] is None):
            raise ApiError(400, f"Unknown field {path}{name}", "fields")
        if sub is not None:
            _check(sub, schema[name], f"{path}{name}.")


def field_spec(text: str | None, kind: str) -> dict[str, Any]:
    """A request's `fields` (or the type's default subset), checked against the type's schema."""
    spec = parse_fields(text or DEFAULTS[kind])
    _check(spec, SCHEMAS[kind])
    return spec


def selected(obj: Any, fields: str | None, kind: str) -> Any:
    """One object of type `kind` cut down to the request's `fields`."""
    return project(obj, field_spec(fields, kind), SCHEMAS[kind])


def project(obj: Any, spec: dict[str, Any] | None, schema: dict[str, Any]) -> Any:
    """`obj` cut down to `spec`; the publicId always comes along."""
    if obj is None:
        return None
    if isinstance(obj, list):
        return [project(o, spec, schema) for o in obj]
    if spec is None:  # a nested object asked for by name only: its reference (publicId, name)
        spec = {k: None for k in schema if k in ("publicId", "name")} or dict.fromkeys(schema)
    keys = list(schema) if "*" in spec else list(spec)
    out = {"publicId": obj.get("publicId")} if "publicId" in schema else {}
    for k in keys:
        if k != "*":
            out[k] = obj.get(k) if schema[k] is None else project(obj.get(k), spec.get(k), schema[k])
    return out


# -- filters -----------------------------------------------------------------------------------
def parse_filters(text: str, schema: dict[str, Any]) -> list[Filter]:
    """`eq(a.b,"x"),in(c,"y","z")` -> [(op, path, args)], all AND-ed; unknown op or field -> 400."""
    out, pos = [], 0
    while pos < len(text):
        m = FILTER_RE.match(text, pos)
        op = ALIASES.get(m[1], m[1]) if m else None
        if not m or op not in OPS:
            raise ApiError(400, "Malformed filters parameter", "filters")
        node: Any = schema
        for part in m[2].split("."):
            if not isinstance(node, dict) or part not in node:
                raise ApiError(400, f"Unknown filter field {m[2]}", "filters")
            node = node[part]
        out.append((op, m[2], [_literal(a.strip()) for a in ARG_RE.findall(m[3])]))
        pos = m.end()
    return out


def matches(obj: Any, filters: list[Filter]) -> bool:
    return all(_test(op, _values(obj, path.split(".")), args) for op, path, args in filters)


def _literal(text: str) -> Any:
    if text.startswith('"'):
        return json.loads(text)
    if text in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[text]
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ApiError(400, "Filter values must be quoted strings, numbers, true, false or null", "filters") from None


def _values(obj: Any, parts: list[str]) -> list[Any]:
    if isinstance(obj, list):
        return [v for o in obj for v in _values(o, parts)]
    if not parts:
        return [obj]
    return _values(obj.get(parts[0]), parts[1:]) if isinstance(obj, dict) else [None]


def _norm(a: Any, b: Any) -> tuple[Any, Any]:
    """Comparable pair: date-times by instant, numbers numerically, anything else as text."""
    if isinstance(a, str) and isinstance(b, str) and DATE_RE.match(a) and DATE_RE.match(b):
        ta, tb = parse_time(a, UTC), parse_time(b, UTC)
        if ta is not None and tb is not None:
            return ta, tb
    if _is_num(a) and _is_num(b):
        return a, b
    return (a, b) if type(a) is type(b) else (str(a), str(b))


def _test(op: str, values: list[Any], args: list[Any]) -> bool:
    if op in ("isnull", "isnotnull"):
        return any(v is None for v in values) == (op == "isnull")
    if op == "ni":
        return not _test("in", values, args)
    if op == "ne":
        return not _test("eq", values, args)
    for v in values:
        if v is None or not args:
            continue
        pairs = [_norm(v, arg) for arg in args]
        x, y = pairs[0]
        if op == "eq" and x == y or op == "in" and any(p == q for p, q in pairs):
            return True
        if op == "contains" and isinstance(x, str) and str(y) in x:
            return True
        try:
            if (op == "lt" and x < y or op == "lte" and x <= y or op == "gt" and x > y or op == "gte" and x >= y
                    or op == "between" and len(pairs) == 2 and x >= y and pairs[1][0] <= pairs[1][1]):
                return True
        except TypeError:
            continue
    return False


# -- DataList ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataRequest:
    """One DataList request, its envelope checked: the source, the window [start, end) and its time zone."""

    source: dict[str, Any]
    start: int
    end: int
    tz: Any
    tzname: str
    specs: list[Any]  # per tag: id or slug, preAggr, queries (checked by `queries` as they are run)
    index: int | None  # in a batch, the request's listIndex

    @classmethod
    def parse(cls, r: Any, index: int | None, sources: dict[str, dict[str, Any]]) -> DataRequest:
        def fail(msg: str, prop: str | None) -> ApiError:
            return ApiError(400, msg, prop, index)

        if not isinstance(r, dict):
            raise fail("A data request must be an object", None)
        src_id = r["source"].get("publicId") if isinstance(r.get("source"), dict) else None
        if not isinstance(src_id, str):
            raise fail("source.publicId is required", "source.publicId")
        src = sources.get(src_id)
        if src is None:
            raise ApiError(404, "Data source not found", "source.publicId", index)
        tzname = r.get("timeZone", "UTC")
        try:
            tz = ZoneInfo(tzname)
        except (TypeError, ValueError, KeyError, OSError):
            raise fail("Unknown timeZone", "timeZone") from None
        start, end = parse_time(r.get("start"), tz), parse_time(r.get("end"), tz)
        if start is None or end is None:
            raise fail("start and end must be ISO 8601 date-times", "start" if start is None else "end")
        if start >= end:
            raise fail("end must be after start", "end")
        specs = r.get("tags")
        if not isinstance(specs, list) or not specs:
            raise fail("tags must be a non-empty list", "tags")
        return cls(src, start, end, tz, tzname, specs, index)

    def queries(self, tags: Sequence[TagT]) -> Iterator[tuple[TagT, str, DataQuery]]:
        """Each query with its tag (found by id, else slug, among the source's `tags`) and its ref, in order."""
        def fail(msg: str, prop: str | None) -> ApiError:
            return ApiError(400, msg, prop, self.index)

        refs: set[str] = set()
        for spec in self.specs:
            tid, slug = (spec.get("id"), spec.get("slug")) if isinstance(spec, dict) else (None, None)
            tag = next((t for t in tags if (tid is not None and t.obj["tagId"] == tid and not isinstance(tid, bool))
                        or (tid is None and slug is not None and t.obj["slug"] == slug)), None)
            if tag is None:
                raise fail("Tag not found in this data source", "tags.id" if tid is not None else "tags.slug")
            if spec.get("preAggr", "raw") != "raw":
                raise fail("preAggr must be raw", "tags.preAggr")
            queries = spec.get("queries")
            if not isinstance(queries, list) or not queries:
                raise fail("queries must be a non-empty list", "tags.queries")
            for q in queries:
                if not isinstance(q, dict):
                    raise fail("A query must be an object", "tags.queries")
                ref = q.get("ref")
                if not isinstance(ref, str) or not ref or ref in refs:
                    raise fail("ref must be a unique non-empty string", "tags.queries.ref")
                refs.add(ref)
                yield tag, ref, DataQuery.parse(q, self.start, self.end, self.index)

    def answer(self, points: dict[int, dict[str, Any]], times: dict[int, str], desc: bool) -> dict[str, Any]:
        """The DataList object: `points` {ms: {ref: value}} in time order; `times` overrides a point's time text."""
        rendered = [{"time": times.get(ms) or iso(ms, self.tz, self.tzname), "values": points[ms]}
                    for ms in sorted(points, reverse=desc)]
        return {"start": iso(self.start, self.tz, self.tzname), "end": iso(self.end, self.tz, self.tzname),
                "timeZone": self.tzname, "source": {"publicId": self.source["publicId"]}, "points": rendered}


# -- DataList queries --------------------------------------------------------------------------
@dataclass(frozen=True)
class DataQuery:
    """One DataList query's options, checked: aggregation, transform, order, offset/limit, shaping."""

    agg: str
    limit: int
    offset: int
    order: str
    decimals: int | None
    op: str
    factor: Any
    step_ms: int
    transform: str | None
    extended: bool  # extendedBoundary: one point either side of the window as well

    @classmethod
    def parse(cls, q: dict[str, Any], start: int, end: int, index: int | None) -> DataQuery:
        def fail(msg: str, prop: str) -> ApiError:
            return ApiError(400, msg, prop, index)

        agg, limit, offset = q.get("postAggr", "raw"), q.get("limit", MAX_LIMIT), q.get("offset", 0)
        order, decimals, op = q.get("order", "asc"), q.get("decimals"), q.get("operator", "*")
        factor, step, transform = q.get("factor"), q.get("step"), q.get("postTransform")
        if agg not in AGGS:
            raise fail(f"postAggr must be one of {', '.join(sorted(AGGS))}", "tags.queries.postAggr")
        if not _is_int(limit) or not 1 <= limit <= MAX_LIMIT:
            raise fail(f"limit must be an integer from 1 to {MAX_LIMIT}", "tags.queries.limit")
        if not _is_int(offset) or offset < 0:
            raise fail("offset must be a non-negative integer", "tags.queries.offset")
        if order not in ("asc", "desc"):
            raise fail("order must be asc or desc", "tags.queries.order")
        if decimals is not None and (not _is_int(decimals) or not 0 <= decimals <= 7):
            raise fail("decimals must be an integer from 0 to 7", "tags.queries.decimals")
        if op not in ("*", "/", "+", "-") or (factor is not None and not _is_num(factor)):
            raise fail("factor must be a number and operator one of * / + -", "tags.queries.factor")
        if transform not in (None, "difference"):
            raise fail("postTransform must be difference", "tags.queries.postTransform")
        step_ms = _duration_ms(step) if step is not None else end - start
        if step_ms is None or step_ms <= 0:
            raise fail("step must be a positive number of seconds or a duration like 5m", "tags.queries.step")
        return cls(agg, limit, offset, order, decimals, op, factor, step_ms, transform,
                   q.get("extendedBoundary") is True)

    @property
    def raw(self) -> bool:
        """Raw points, untransformed: the page can be cut before any value is computed."""
        return self.agg == "raw" and self.transform is None

    def page(self, items: Sequence[T]) -> Sequence[T]:
        """`items` (ascending) in the asked order, cut to offset/limit."""
        return (items if self.order == "asc" else items[::-1])[self.offset:self.offset + self.limit]

    def run(self, series: list[tuple[int, Any]], start: int) -> list[tuple[int, Any]]:
        """The ascending window `series` aggregated into steps from `start`, transformed, paged and shaped."""
        if self.agg != "raw":
            buckets: dict[int, list[Any]] = {}
            for ms, v in series:
                buckets.setdefault(start + (ms - start) // self.step_ms * self.step_ms, []).append(v)
            series = [(ms, _aggregate(self.agg, vs)) for ms, vs in sorted(buckets.items())]
        if self.transform == "difference":
            series = [(ms, v - p if _is_num(v) and _is_num(p) else None)
                      for (_, p), (ms, v) in zip(series, series[1:], strict=False)]
        return self.shaped(self.page(series))

    def shaped(self, series: Iterable[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """Numbers through factor/operator, then rounded to `decimals`."""
        return [(ms, self._shape(v)) for ms, v in series]

    def _shape(self, v: Any) -> Any:
        if not _is_num(v):
            return v
        if self.factor is not None:
            f = self.factor
            v = {"*": v * f, "/": v / f if f else None, "+": v + f, "-": v - f}[self.op]
        return round(v, self.decimals) if self.decimals is not None and v is not None else v


def _aggregate(agg: str, values: list[Any]) -> Any:
    if agg == "count":
        return len(values)
    if agg in ("first", "last"):
        return values[0] if agg == "first" else values[-1]
    if agg == "mode":
        return statistics.mode(values)
    nums = [float(v) for v in values if isinstance(v, int | float)]  # bools count as 0/1, strings drop out
    if not nums:
        return None
    funcs = {"mean": statistics.fmean, "median": statistics.median, "sum": math.fsum, "max": max, "min": min,
             "spread": lambda xs: max(xs) - min(xs)}
    return funcs[agg](nums)  # type: ignore[operator]


# -- values ------------------------------------------------------------------------------------
def iso(ms: int, tz: Any = UTC, tzname: str = "UTC") -> str:
    """ISO 8601 in `tz`, milliseconds only when non-zero, `Z` for UTC (as the brief's examples print it)."""
    dt = (EPOCH + timedelta(milliseconds=ms)).astimezone(tz)
    frac = f".{ms % 1000:03d}" if ms % 1000 else ""
    if tzname == "UTC":
        return dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"
    off = dt.strftime("%z")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + f"{off[:3]}:{off[3:]}"


def parse_time(value: Any, tz: Any) -> int | None:
    """ISO date-time to epoch ms; a value without offset is read in the request's timeZone."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return (dt - EPOCH) // timedelta(milliseconds=1)


def _duration_ms(value: Any) -> int | None:
    if _is_num(value):
        return int(value * 1000)
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", value) if isinstance(value, str) else None
    return int(m[1]) * DURATION_MS[m[2]] if m else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


SCHEMAS = {  # every field a type has; nested objects are sub-dicts
    "Company": parse_fields("publicId,name,custom,branding(publicId,name)"),
    "Agent": parse_fields("publicId,name,deviceId,serialNumber,macAddress,activeStatus,"
                          "activeVpnSession(publicId,startedOn),vpnChangedOn,mqttChangedOn,timeZone,"
                          "company(publicId,name),dataSources(publicId,name,slug)"),
    "DataSource": parse_fields("publicId,name,slug,disabled,protocol(publicId,name),valuesPerHour,"
                               "agent(publicId,name),device(publicId,name)"),
    "DataTag": parse_fields("publicId,tagId,name,slug,source(publicId,name,slug),retentionPolicy,logEvent,"
                            "loggingInterval,variable(variableId,name,slug,type,unit,factor)"),
    "AlarmOccurrence": parse_fields("publicId,alarm(publicId,name,type,severity),occurredOn,rtnOn,acknowledged,"
                                    "acknowledgedOn,silenced,stillActiveOn,comment"),
    "AccessToken": parse_fields("publicId,secretId,expiresOn,lastUsedOn,trustedDeviceName"),
}
DEFAULTS = {"Company": "publicId,name", "Agent": "publicId,name", "DataSource": "publicId,name",
            "DataTag": "publicId,tagId,name,slug", "AlarmOccurrence": "publicId,occurredOn,rtnOn",
            "AccessToken": "publicId,secretId,expiresOn"}
