"""Ioto quirks a connector could get wrong, each proved against the simulator over real sockets."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from syncd.errors import RateLimited, RequestRejected, VendorAuthError, VendorUnavailable
from syncd.sim.common import sims_in_thread
from syncd.sim.ioto import LAG, IotoSim
from syncd.sources.ioto import IotoSource
from tests.helpers import syncd, truth_keys, write_config
from tests.test_ioto_e2e import EVERYTHING, FAST, ioto_config, run_once, stored


class FakeClock:
    def __init__(self, t: float = 1_732_356_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def small(**kw: Any) -> IotoSim:
    return IotoSim(**{"seed": 30, "devices": 3, "logs": 90, "alerts": 8, "rate_limit": None, **kw})


def of_kind(keys: Any, *kinds: str) -> set[Any]:
    return {k for k in keys if k[0] in kinds}


def settle(sim: IotoSim, clock: FakeClock) -> None:
    """Live truth lags the API by LAG seconds: step the fake clock so both show the same world."""
    clock.t += LAG


def test_auth_failure_is_403_text_and_the_token_is_never_logged(tmp_path: Path) -> None:
    sim = small()
    with sims_in_thread([sim]):
        cfg = ioto_config(tmp_path, sim, FAST)
        cfg.write_text(cfg.read_text().replace(sim.token, "wrong-token-0123456789"))
        r = syncd("run", "--config", str(cfg), "--once")
    assert r.returncode == 1
    logs = r.stdout + r.stderr
    assert r.stderr.count('"source.failed"') == 1 and "token refused (403)" in r.stderr
    assert "wrong-token-0123456789" not in logs and sim.token not in logs
    assert len(sim.requests) == 1  # terminal: no retries, no other stream tried


def _raw(sim: IotoSim, path: str, body: Any, *, token: str | None = None, method: str = "POST") -> Any:
    req = urllib.request.Request(sim.url + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Authorization": token or sim.token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return IotoSource.map_error(resp.status, CIMultiDict(resp.headers.items()), resp.read(), path)
    except urllib.error.HTTPError as err:
        return IotoSource.map_error(err.code, CIMultiDict(err.headers.items()), err.read(), path)


def test_text_plain_and_gateway_json_errors_are_mapped() -> None:
    sim = small()
    with sims_in_thread([sim]):
        assert _raw(sim, "/tok/alert/find", {}) is None
        bad = _raw(sim, "/tok/generic/find", {})  # 400 text/plain
        assert isinstance(bad, RequestRejected) and "Missing _type" in str(bad)
        auth = _raw(sim, "/tok/generic/find", {"_type": "Log"}, token="nope")  # 403 text/plain
        assert isinstance(auth, VendorAuthError) and "Invalid authorization token" in str(auth)
        wrong_path = _raw(sim, "/tok/generic/find", {}, method="PUT")  # 403 JSON from the gateway: not the token
        assert isinstance(wrong_path, RequestRejected) and not isinstance(wrong_path, VendorAuthError)
        assert "Missing Authentication Token" in str(wrong_path) and "base_url" in str(wrong_path)
        sim.faults.storm_429 = 1
        limited = _raw(sim, "/tok/alert/find", {})
        assert isinstance(limited, RateLimited) and limited.retry_after is None and "Too Many Requests" in str(limited)
        sim.faults.error_5xx = 2  # 503 JSON (gateway), then 500 text/plain (Ioto)
        for _ in range(2):
            assert isinstance(_raw(sim, "/tok/alert/find", {}), VendorUnavailable)
        sim.gateway_timeouts, sim.gateway_delay = 1, 0.05
        timeout = _raw(sim, "/tok/alert/find", {})
        assert isinstance(timeout, VendorUnavailable) and "Endpoint request timed out" in str(timeout)


def test_gateway_json_faults_are_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    sim = small()
    with sims_in_thread([sim]):
        cfg = ioto_config(tmp_path, sim, FAST)
        sim.faults.update({"storm_429": 2, "error_5xx": 1})
        sim.gateway_timeouts, sim.gateway_delay = 1, 0.1
        r = run_once(cfg)
    assert '"http.rate_limited"' in r.stderr and '"http.retry"' in r.stderr
    assert stored(tmp_path)[0].keys() == truth_keys(sim).keys()


def test_every_request_is_a_post_under_tok_with_the_raw_token(tmp_path: Path) -> None:
    sim = small()
    with sims_in_thread([sim]):
        run_once(ioto_config(tmp_path, sim, FAST))
    assert sim.requests
    for req in sim.requests:
        assert req.method == "POST" and req.path.startswith("/tok/"), (req.method, req.path)
        assert req.headers["Authorization"] == sim.token  # no "Bearer" scheme
        assert req.headers["Content-Type"] == "application/json"
        if req.path in ("/tok/generic/find", "/tok/device/find", "/tok/alert/find"):
            assert ("paged", "true") in req.query and dict(req.query)["limit"].isdigit()
    assert stored(tmp_path)[0].keys() == truth_keys(sim).keys()


LOG_COUNTS = "SELECT count(), uniqExact(event_id) FROM syncd.events WHERE kind = 'log'"


def test_next_cursor_paging_small_limit_then_new_logs_are_picked_up(tmp_path: Path) -> None:
    clock = FakeClock()
    sim = IotoSim(seed=31, clock=clock, live=True, devices=3, logs=120, rate_limit=None, page_bytes=1500)
    with sims_in_thread([sim]):
        cfg = ioto_config(tmp_path, sim, FAST + "page_size = 7\n")
        run_once(cfg)
        first = [r for r in sim.requests if r.path == "/tok/generic/find" and b'"Log"' in r.body]
        settle(sim, clock)
        truth = of_kind(truth_keys(sim), "log")
        keys, (counts,) = stored(tmp_path, LOG_COUNTS)
        assert of_kind(keys, "log") == truth
        assert counts == [[len(truth), len(truth)]] and len(truth) >= 120
        # 40 logs per device, at most 7 a page and cut short by the byte cap: many pages, each `next` sent back
        assert len(first) > 3 * 6 and all(dict(r.query)["limit"] == "7" for r in first)
        assert sum(1 for r in first if "next" in dict(r.query)) == len(first) - 3
        clock.t += 3 * 3600  # the cloud logs on
        sim.requests.clear()
        run_once(cfg)
        second = [r for r in sim.requests if r.path == "/tok/generic/find" and b'"Log"' in r.body]
        settle(sim, clock)
        truth2 = of_kind(truth_keys(sim), "log")
        keys, (counts,) = stored(tmp_path, LOG_COUNTS)
    assert len(truth2) > len(truth)
    assert of_kind(keys, "log") == truth2
    assert counts == [[len(truth2), len(truth2)]]  # the new ones added, nothing read twice
    assert all("next" in dict(r.query) for r in second)  # resumed at the stored cursor, not from the top
    assert len(second) < len(first) / 2


def test_metric_timestamps_in_seconds_or_milliseconds(tmp_path: Path) -> None:
    seconds, millis = small(seed=33), small(seed=34, metric_ms=True)
    with sims_in_thread([seconds, millis]):
        cfg = write_config(tmp_path, [seconds, millis], EVERYTHING)
        text = cfg.read_text().replace('name = "ioto-sim"', 'name = "ioto-ms"', 1)  # two sources, two names
        cfg.write_text(text.replace('interval = "5s"', 'interval = "5s"\n' + FAST + 'streams = ["metric"]'))
        run_once(cfg)
    truth = {k: v for sim in (seconds, millis) for k, v in truth_keys(sim).items() if k[0] == "metric"}
    keys = stored(tmp_path)[0]
    assert keys == truth and len(truth) == 2 * 3 * 3 * 5
    year = {datetime.fromtimestamp(k[4] / 1000, UTC).year for k in keys}
    assert year == {datetime.fromtimestamp(seconds.end_ms / 1000, UTC).year}


def test_resolved_alert_is_re_emitted_under_the_same_key(tmp_path: Path) -> None:
    clock = FakeClock()
    sim = IotoSim(seed=32, clock=clock, live=True, devices=3, logs=30, alerts=40, rate_limit=None)
    query = ("SELECT metric, toUnixTimestamp64Milli(ts), event_id, attrs['resolved'], toUnixTimestamp64Milli(ingested_at) "
             "FROM syncd.events FINAL WHERE kind = 'alert'")
    with sims_in_thread([sim]):
        cfg = ioto_config(tmp_path, sim, FAST + 'streams = ["alert"]\n')
        run_once(cfg)
        _, (before,) = stored(tmp_path, query)
        clock.t += 12 * 3600  # open alerts resolve as time goes by
        run_once(cfg)
        keys, (after, counts) = stored(tmp_path, query, "SELECT uniqExact(event_id), count() FROM syncd.events FINAL")
        settle(sim, clock)
        w = sim._world_ms() - int(LAG * 1000)
        api = {(a["name"], ts): a["resolved"] for a, ts in (sim._alert(k, w) for k in range(sim._alerts.count(w, True)))}
        assert of_kind(keys, "alert") == of_kind(truth_keys(sim), "alert")
    was = {(r[0], r[1]): r for r in before}
    now = {(r[0], r[1]): r for r in after}
    assert counts[0][0] == counts[0][1] == len(now) == len(api)  # one row per alert FINAL
    assert {key: r[3] == "true" for key, r in now.items()} == api
    flipped = [key for key, r in was.items() if r[3] == "false" and now[key][3] == "true"]
    assert flipped
    for key in flipped:
        assert now[key][2] == was[key][2] and now[key][4] > was[key][4]  # same event_id, newer ingested_at
    unchanged = [key for key, r in was.items() if r[3] == now[key][3]]
    assert unchanged and all(now[key][4] == was[key][4] for key in unchanged)  # nothing else re-sent


def test_device_connection_is_an_opt_in_status_stream(tmp_path: Path) -> None:
    sim = small()
    with sims_in_thread([sim]):
        cfg = ioto_config(tmp_path, sim, FAST + 'streams = ["connection"]\n')
        run_once(cfg)
        run_once(cfg)
    expected = {("status", d["accountId"], d["id"], "connection",
                 int(datetime.fromisoformat(d["updated"].replace("Z", "+00:00")).timestamp() * 1000)):
                (None, d["connection"]) for d in (sim._device(i, sim.end_ms) for i in range(3))}
    keys, (count,) = stored(tmp_path, "SELECT count() FROM syncd.events")
    assert keys == expected and count == [[3]]
    assert not any(k[3] == "connection" for k in truth_keys(sim))  # not a default stream


def test_start_bounds_the_first_sync_of_logs_and_alerts(tmp_path: Path) -> None:
    sim = small()
    cut = sim.start_ms + 86_400_000
    with sims_in_thread([sim]):
        iso = datetime.fromtimestamp(cut / 1000, UTC).isoformat()
        run_once(write_config(tmp_path, [sim], f'start = "{iso}"\n' + FAST))
    truth = truth_keys(sim)
    expected = {k for k in truth if k[0] not in ("log", "alert") or k[4] >= cut}
    assert stored(tmp_path)[0].keys() == expected
    assert len(of_kind(expected, "log")) < len(of_kind(truth, "log"))
