"""Navixy IoT Logic: NGP telemetry pushed to the operator's MQTT broker, and flow/endpoint health polled over REST.

Brief: shared/vendors/navixy.md. Assumptions live in the constants below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiomqtt
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field

from syncd.errors import (
    MalformedResponse,
    RateLimited,
    RequestRejected,
    SyncdError,
    VendorAuthError,
    VendorUnavailable,
)
from syncd.settings import NavixySource as NavixyConfig
from syncd.sources.base import (
    DeadLetter,
    Page,
    PageBuilder,
    Source,
    Stream,
    loads_lenient,
    mapped,
    spoolable_text,
    valid,
    valid_all,
)
from syncd.sources.mqtt_push import MqttSubscription, payload_bytes, topic_matches
from syncd.sources.paging import OffsetPaginator, collect
from syncd.sources.times import IsoMs
from syncd.sources.track import ChangeTracker

log = structlog.get_logger("syncd.navixy")

FLOWS = "/iot/logic/flow/list"
ENDPOINTS = "/iot/logic/flow/endpoint/list"  # POST, as endpoint/read [D-oas]
ENDPOINT_READ = "/iot/logic/flow/endpoint/read"
MAPPING = "/iot/logic/flow/sources/mapping/list"
MAPPING_PAGE = 10_000  # sources/mapping/list default limit [D-oas]
MAPPING_MAX = 100_000  # its largest limit; more is refused with code 212 [D-oas][D-err]
# NGP header fields: kept as attrs, never metrics [A: §8 maps them to attrs]
NGP_HEADER = ("device_id", "message_time", "version", "event_id")
TRACKER_REFRESH_S = 300.0  # an NGP device_id missing from tracker/list reloads it at most this often [A]


class Flow(BaseModel):
    """A `flow/list` entry [D-oas]."""

    model_config = ConfigDict(extra="ignore")

    id: int
    title: str = ""
    enabled: bool
    default_flow: bool = False
    modified: IsoMs | None = None
    devices_count: int | None = None


class Endpoint(BaseModel):
    """An output endpoint as `endpoint/list` (no status) or `endpoint/read` returns it [D-oas]."""

    model_config = ConfigDict(extra="ignore")

    id: int
    type: str = ""
    title: str = ""
    status: str = ""
    properties: dict[str, Any] = {}

    @property
    def topics(self) -> list[str]:
        topics = self.properties.get("topics")
        return [t for t in topics if isinstance(t, str)] if isinstance(topics, list) else []


class TrackerSource(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    device_id: str
    model: str = ""


class Tracker(BaseModel):
    """A `tracker/list` entry: `id` is the tracker object, `source.id` the device id IoT Logic uses [D-trk]."""

    model_config = ConfigDict(extra="ignore")

    id: int
    label: str = ""
    source: TrackerSource


class FlowMapping(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_id: int  # a source id
    flow_id: int | None = None
    flow_title: str = ""


class NgpHeader(BaseModel):
    """The mandatory part of an NGP message [D-ngp]; every other key is an attribute."""

    model_config = ConfigDict(extra="ignore")

    device_id: str = Field(min_length=1)
    message_time: IsoMs
    version: Any = None  # optional: any shape is kept as text, never a reason to drop the message
    event_id: Any = None


Metric = tuple[str, float | None, str | None]  # (metric, value, text) of one NGP attribute


def flatten(prefix: str, value: Any, out: list[Metric]) -> None:
    """NGP attributes as (metric, value, text): nested keys joined with dots, bools 1/0, strings as text.

    JSON null and arrays (e.g. `mobile_cells`) carry no single value and give no metric [A].
    """
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, bool):
        out.append((prefix, 1.0 if value else 0.0, None))
    elif isinstance(value, int | float):
        out.append((prefix, float(value), None))
    elif isinstance(value, str):
        out.append((prefix, None, value))


class NavixySource(Source):
    vendor = "navixy"
    # kind=status is opt-in: endpoint status has no vendor time, so each change is stamped with the poll time
    default_streams = ("telemetry",)
    default_rate = 25.0  # 50 req/s per user and per IP [S]; the IP limit is shared with other apps [A]
    default_burst = 10

    config: NavixyConfig

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.root = self.config.api_root
        self.tenant = ""
        self.devices: dict[str, dict[str, str]] = {}  # NGP device_id -> attrs from tracker/list
        self.devices_at = float("-inf")
        self._subscription: MqttSubscription | None = None
        self._newest_ms: int | None = None

    # -- REST -------------------------------------------------------------------------------------

    @staticmethod
    def map_error(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Exception | None:
        """Decide on the HTTP status: the documents disagree on the `status.code` numbers [S][D-auth][D-err]."""
        if status < 400:
            return None
        code, text = _navixy_status(body)
        msg = f"{status} from {url}" + (f" (Navixy code {code}: {text})" if code is not None else "")
        if status in (401, 403):
            return VendorAuthError(f"API key refused: {msg}", status=status, body=text, url=url)
        if status == 429:
            return RateLimited(f"rate limited: {msg}", status=status, body=text, url=url)
        if status >= 500 or status == 408:
            return VendorUnavailable(f"vendor error {msg}", status=status, body=text, url=url)
        return RequestRejected(f"request rejected: {msg}", status=status, body=text, url=url)

    async def _call(self, method: str, path: str, *, params: Any = None, json: Any = None) -> dict[str, Any]:
        key = self.config.api_key.get_secret_value()
        resp = await self.client.request(method, f"{self.root}{path}", headers={"Authorization": f"NVX {key}"},
                                         params=params, json=json, expect_json=True)
        body = resp.data
        if not isinstance(body, dict):
            raise MalformedResponse(f"{path}: the answer is not a JSON object", status=resp.status, url=path)
        if body.get("success") is not True:
            code, text = _navixy_status(orjson.dumps(body))
            raise RequestRejected(f"{path}: success is not true (Navixy code {code}: {text})", status=resp.status, url=path)
        return body

    async def login(self) -> None:
        """Read the account (user id = tenant); a refused key fails the first run here."""
        body = await self._call("GET", "/user/get_info")
        info = body.get("user_info")
        if not isinstance(info, dict) or not isinstance(info.get("id"), int):
            raise MalformedResponse("user/get_info without user_info.id", url="/user/get_info")
        self.tenant = str(info["id"])

    async def discover(self) -> list[Stream]:
        if not self.tenant:
            await self.login()
        await self._load_devices()
        streams = []
        for kind in self.enabled_kinds:
            if kind == "status":
                streams.append(Stream("status", "status", self.tenant))
            elif kind == "telemetry" and self.config.mqtt_url and self.config.topics:
                streams.append(Stream("telemetry", "telemetry", self.tenant, push=True))
            else:
                log.warning("navixy.stream_skipped", source=self.name, stream=kind,
                            hint="telemetry needs mqtt_url and topics; navixy streams are telemetry and status")
        return streams

    async def _load_devices(self) -> None:
        """NGP device_id -> source id with label/model from tracker/list, flow from the paged mapping list.

        Both lists are enrichment only: telemetry is keyed by the NGP device_id, so a row we cannot read costs
        attrs, never an event. Such rows are skipped, counted in a warning, not dead-lettered (no stream owns them).
        """
        skipped: list[DeadLetter] = []
        trackers = valid_all(Tracker, _list(await self._call("POST", "/tracker/list", json={}), "/tracker/list"), skipped)

        async def mapping_page(pager: OffsetPaginator) -> list[Any]:
            body = await self._call("GET", MAPPING, params=pager.params())
            rows = _list(body, MAPPING)
            pager.update_state(len(rows), body.get("count"), MAPPING)  # `count` is the listing's total [D-oas]
            return rows

        pager = OffsetPaginator(limit=min(self.config.page_size or MAPPING_PAGE, MAPPING_MAX))
        flows = {row.device_id: row.flow_id for row in valid_all(FlowMapping, await collect(pager, mapping_page), skipped)}
        if skipped:
            log.warning("navixy.inventory_rows_skipped", source=self.name, rows=len(skipped), first=skipped[0].reason)
        devices: dict[str, dict[str, str]] = {}
        for t in trackers:
            attrs = {"device_id": t.source.device_id, "source_id": str(t.source.id), "label": t.label,
                     "model": t.source.model, "tracker_id": str(t.id)}
            if flows.get(t.source.id) is not None:
                attrs["flow_id"] = str(flows[t.source.id])
            devices[t.source.device_id] = attrs
        self.devices, self.devices_at = devices, self.clock()

    async def mqtt_outputs(self) -> list[tuple[Flow, Endpoint]]:
        """Every (flow, output endpoint) pair with the endpoint as `endpoint/read` has it, for `syncd check`."""
        flows = [Flow.model_validate(f) for f in _list(await self._call("GET", FLOWS), FLOWS)]
        endpoints: dict[int, Endpoint] = {}
        out = []
        for flow in flows:
            value = (await self._call("GET", "/iot/logic/flow/read", params={"flow_id": flow.id})).get("value") or {}
            for node in value.get("nodes") or []:
                eid = (node.get("data") or {}).get("output_endpoint_id") if node.get("type") == "output_endpoint" else None
                if not isinstance(eid, int):
                    continue
                if eid not in endpoints:
                    read = await self._call("POST", ENDPOINT_READ, json={"endpoint_id": eid})
                    endpoints[eid] = Endpoint.model_validate(read.get("value"))
                out.append((flow, endpoints[eid]))
        return out

    async def health(self, stream: Stream) -> str:
        """The push stream receives only while an enabled flow's MQTT endpoint publishes to our topics and is active."""
        if not stream.push:
            return ""
        feeding = [ep for flow, ep in await self.mqtt_outputs() if flow.enabled and ep.type == "output_mqtt_client"
                   and any(topic_matches(want, t) for want in self.config.topics for t in ep.topics)]
        if not feeding:
            return "no enabled Navixy flow has an MQTT output endpoint publishing to the configured topics"
        down = [ep for ep in feeding if ep.status not in ("", "active")]
        if len(down) == len(feeding):
            return "; ".join(f"output endpoint {ep.title!r} ({ep.id}) is {ep.status}" for ep in down)
        return ""

    # -- status (polled) --------------------------------------------------------------------------

    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        """kind=status: one event per flow `enabled` and endpoint `status` that changed since the last poll.

        The cursor is {"flows": {id: "modified/enabled"}, "endpoints": {id: status}}, one ChangeTracker each.
        """
        seen = cursor if isinstance(cursor, dict) else {}
        flows, endpoints = ChangeTracker(seen.get("flows")), ChangeTracker(seen.get("endpoints"))
        now_ms = self.now_ms()
        b = PageBuilder(self)
        dead: list[DeadLetter] = []
        for flow in valid_all(Flow, _list(await self._call("GET", FLOWS), FLOWS), dead):
            if not flows.moved(str(flow.id), f"{flow.modified}/{int(flow.enabled)}"):
                continue
            attrs = {"title": flow.title, "default_flow": str(flow.default_flow).lower()}
            if flow.devices_count is not None:
                attrs["devices_count"] = str(flow.devices_count)
            b.add("status", stream.tenant, f"flow:{flow.id}", "enabled",
                  flow.modified if flow.modified is not None else now_ms, 1.0 if flow.enabled else 0.0, None, attrs)
        for ref in valid_all(Endpoint, _list(await self._call("POST", ENDPOINTS, json={}), ENDPOINTS), dead):
            # status is only in endpoint/read [D-oas]
            read = await self._call("POST", ENDPOINT_READ, json={"endpoint_id": ref.id})
            for ep in valid(Endpoint, [read.get("value")], dead):
                # the mark is spooled in the cursor as UTF-8 JSON (the tracker escapes keys, not marks)
                if endpoints.moved(str(ep.id), spoolable_text(ep.status)):
                    b.add("status", stream.tenant, f"endpoint:{ep.id}", "status", now_ms, None, ep.status,
                          {"title": ep.title, "type": ep.type})
        return b.page({"flows": flows.state(), "endpoints": endpoints.state()}, done=True, dead=dead, lag_s=0.0)

    # -- telemetry (pushed) -----------------------------------------------------------------------

    def subscription(self) -> MqttSubscription:
        """The broker session; its client id is stable across restarts so the broker keeps what came meanwhile."""
        if self._subscription is None:
            self._subscription = MqttSubscription(
                self.config.mqtt_url, list(self.config.topics), client_id=f"syncd-{self.instance}-{self.name}",
                username=self.config.mqtt_username, password=self.config.mqtt_password.get_secret_value(),
                timeout=self.config.timeout, tls_verify=self.config.tls_verify)
        return self._subscription

    async def listen(self, stream: Stream, deliver: Callable[[Page], Awaitable[None]], stop: asyncio.Event,
                     idle: float | None) -> None:
        """NGP messages from the configured topics, one page per batch; the batch is acked after `deliver`."""

        async def handle(batch: list[aiomqtt.Message]) -> None:
            records = [_record(m) for m in batch]
            await self._refresh_devices(records)
            await deliver(self._page(stream, records))

        await self.subscription().run(handle, stop, idle)

    async def _refresh_devices(self, records: list[dict[str, Any] | DeadLetter]) -> None:
        """A device_id we do not know may be a new tracker: reload the list, not more often than TRACKER_REFRESH_S."""
        if self.clock() - self.devices_at < TRACKER_REFRESH_S:
            return
        # a device_id that is no string (a list, say: unhashable) is dead-lettered, never looked up
        if any(isinstance(r, dict) and isinstance(r.get("device_id"), str) and r["device_id"] not in self.devices
               for r in records):
            try:
                await self._load_devices()
            except SyncdError as err:  # telemetry goes on with the devices we know
                self.devices_at = self.clock()
                log.warning("navixy.devices_not_refreshed", source=self.name, error=str(err))

    def _page(self, stream: Stream, records: list[dict[str, Any] | DeadLetter]) -> Page:
        """One MQTT batch as one page: every metric of every NGP message, or the message's dead letter."""
        b = PageBuilder(self)
        dead = [r for r in records if isinstance(r, DeadLetter)]
        messages = [r for r in records if not isinstance(r, DeadLetter)]
        for head, attrs, metrics in mapped(messages, dead, self._telemetry):
            for metric, value, text in metrics:
                b.add("telemetry", stream.tenant, head.device_id, metric, head.message_time, value, text, attrs)
            self._newest_ms = max(self._newest_ms or head.message_time, head.message_time)
        lag = max(0.0, self.clock() - self._newest_ms / 1000) if self._newest_ms is not None else None
        cursor = {"session": self.subscription().client_id, "newest_ms": self._newest_ms}
        return b.page(cursor, done=False, dead=dead, lag_s=lag)

    def _telemetry(self, ngp: dict[str, Any]) -> tuple[NgpHeader, dict[str, str], list[Metric]]:
        """One NGP message as (its header, its attrs, its metrics); raises on anything unreadable (the caller
        dead-letters it), so a message gives all its events or none.

        The device is the NGP `device_id`, the one id every message carries. The brief's source id [A] is known only
        once tracker/list lists the tracker: a series would change key when the list refreshes, and a redelivered
        message would land twice. The source id, tracker id, label, model and flow go into attrs when known.
        """
        head = NgpHeader.model_validate(ngp)
        attrs = dict(self.devices.get(head.device_id, {"device_id": head.device_id}))
        if head.event_id is not None:
            attrs["event_id"] = str(head.event_id)
        if head.version is not None:
            attrs["version"] = str(head.version)
        metrics: list[Metric] = []
        for key, value in ngp.items():
            if key not in NGP_HEADER:
                flatten(key, value, metrics)
        return head, attrs, metrics


def _record(m: aiomqtt.Message) -> dict[str, Any] | DeadLetter:
    """An MQTT message as an NGP JSON object, or the dead letter saying why it is not one."""
    raw = payload_bytes(m.payload)
    try:
        ngp = loads_lenient(raw)  # NaN, Infinity, lone surrogates: the guard decides about them
    except ValueError as err:
        return DeadLetter(f"payload: not JSON ({err}) on topic {m.topic.value}", raw.decode("utf-8", "replace"))
    if not isinstance(ngp, dict):
        return DeadLetter(f"payload: not a JSON object on topic {m.topic.value}", raw.decode("utf-8", "replace"))
    return ngp


def _list(body: dict[str, Any], path: str) -> list[Any]:
    """The `list` of a list answer (absent = empty); any other shape is malformed, never taken as empty."""
    items = body.get("list")
    if items is None:
        return []
    if not isinstance(items, list):
        raise MalformedResponse(f"{path}: list is not an array", body=str(items)[:200], url=path)
    return items


def _navixy_status(body: bytes) -> tuple[int | None, str]:
    """`status.code` and `status.description` of a Navixy error body, for messages only."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, body[:200].decode("utf-8", "replace")
    status = data.get("status") if isinstance(data, dict) else None
    if not isinstance(status, dict):
        return None, ""
    code = status.get("code")
    return (code if isinstance(code, int) else None), str(status.get("description") or "")
