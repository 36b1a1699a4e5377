"""The vendor budget: how much of a vendor's request limit `syncd run` uses, and how often it overshoots.

Two scenarios, each a `syncd run` daemon (a subprocess) against an IXON simulator in this process, with more
agents than the limit can serve (request-bound), counted on the simulator's side (every request, 429s too):

- ixon:   IXON's documented limit, 50 req/s and 3000 req/min per credential (the simulator buffers a short
          excess, answers 429 beyond). Over minutes both bind at 50 req/s. Target: achieved >= 0.95 of it,
          429s < 1%. The source's rate and burst are the connector's defaults unless --rate / --burst are given.
- strict: a vendor that allows 5 req/s and answers 429 at once beyond it (no buffer, no Retry-After), with
          `rate = 20` configured (4x too high). Target: 429s < 5% of requests after the first --settle seconds.

Usage: python bench/bench_budget.py [--duration 120] [--strict-duration 120] [--only ixon|strict]
       [--agents 150] [--rate R] [--burst B] [--keep DIR]
Figures depend on the machine: on a shared, busy one the daemon may be CPU-bound below the limit.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from syncd.sim.common import sims_in_thread
from syncd.sim.ixon import IxonSim
from syncd.sim.server import config_toml

IXON_LIMIT = 50.0  # req/s: 50/s and 3000/min (= 50/s over a minute) [IXON brief §4]
STRICT_LIMIT = 5  # req/s of the strict scenario
STRICT_RATE = 20.0  # the misconfigured rate of the strict scenario
INTERVAL = "2s"  # each stream asks every 2 s: agents × 2 streams / 2 s is far above the limit


@dataclass
class Seen:
    """Requests as the simulator received them: arrival time and the status it answered."""

    at: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    took: list[float] = field(default_factory=list)  # seconds from arrival to the answer (the buffer's wait too)

    def slices(self, start: float, end: float, step: float) -> str:
        """Answered (non-429) requests per second in each `step` seconds, and the mean time to answer."""
        out = []
        while start < end - 1e-9:
            sel = [(s, d) for t, s, d in zip(self.at, self.status, self.took, strict=True) if start <= t < start + step]
            ok = sum(1 for s, _ in sel if s != 429)
            out.append(f"{ok / step:.1f}/{1000 * sum(d for _, d in sel) / max(1, len(sel)):.0f}ms")
            start += step
        return " ".join(out)

    def window(self, start: float, end: float) -> tuple[int, int]:
        """(requests, 429s) that arrived in [start, end)."""
        sel = [s for t, s in zip(self.at, self.status, strict=True) if start <= t < end]
        return len(sel), sum(1 for s in sel if s == 429)


class CountedIxonSim(IxonSim):
    """The IXON simulator with an outermost middleware that sees every request, the ones its buffer refuses too."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen = Seen()

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.insert(0, self._note)
        return app

    @web.middleware
    async def _note(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        at = time.monotonic()
        response = await handler(request)
        self.seen.at.append(at)
        self.seen.status.append(response.status)
        self.seen.took.append(time.monotonic() - at)
        return response


def run_daemon(sim: CountedIxonSim, tmp: Path, name: str, duration: float, settings: dict[str, Any]) -> float:
    """`syncd run` for `duration` seconds from the first request the simulator sees; returns that first moment."""
    log = tmp / f"{name}.log"
    text = config_toml([sim], f"{tmp}/{name}").replace('interval = "5s"', f'interval = "{INTERVAL}"\nstart = "1h"')
    for key, value in settings.items():
        text += f"{key} = {value!r}\n"
    cfg = tmp / f"{name}.toml"
    cfg.write_text(text)
    cfg.chmod(0o600)
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while not sim.seen.at:  # the daemon's start (imports, the embedded ClickHouse) is not the vendor's
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"syncd did not start (exit {proc.poll()}); see {log}")
                time.sleep(0.05)
            first = sim.seen.at[0]
            time.sleep(max(0.0, first + duration - time.monotonic()))
            if proc.poll() is not None:
                sys.exit(f"syncd exited early ({proc.returncode}); see {log}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return first


def ixon(args: argparse.Namespace, tmp: Path) -> str:
    sim = CountedIxonSim(seed=11, agents=args.agents, tags_per_agent=20, points_per_tag=4, history=1800.0, alarms=1)
    settings: dict[str, Any] = {"concurrency": args.concurrency}
    if args.rate:
        settings["rate"] = args.rate
    if args.burst:
        settings["burst"] = args.burst
    with sims_in_thread([sim]):
        first = run_daemon(sim, tmp, "ixon", args.duration, settings)
    n, limited = sim.seen.window(first, first + args.duration)
    achieved = (n - limited) / args.duration
    return (f"ixon ({args.agents} agents, {args.duration:.0f} s, {settings}): achieved {achieved:.1f} req/s = "
            f"{achieved / IXON_LIMIT:.3f} of the {IXON_LIMIT:.0f} req/s limit (target >= 0.95), "
            f"429s {100 * limited / max(1, n):.2f}% (target < 1%) of {n} requests\n"
            f"  per {args.slice:.0f} s (answered/s, mean time to answer): "
            f"{sim.seen.slices(first, first + args.duration, args.slice)}")


def strict(args: argparse.Namespace, tmp: Path) -> str:
    # A buffer of STRICT_LIMIT a second admits no more than the limit itself: beyond it, 429 at once.
    sim = CountedIxonSim(seed=12, agents=20, tags_per_agent=20, points_per_tag=4, history=1800.0, alarms=1,
                         rate_limit=(STRICT_LIMIT, 60 * STRICT_LIMIT), buffer=STRICT_LIMIT)
    settings = {"rate": STRICT_RATE, "concurrency": args.concurrency}
    with sims_in_thread([sim]):
        first = run_daemon(sim, tmp, "strict", args.strict_duration, settings)
    end = first + args.strict_duration
    n0, limited0 = sim.seen.window(first, first + args.settle)
    n, limited = sim.seen.window(first + args.settle, end)
    ok = (n - limited) / max(1e-9, args.strict_duration - args.settle)
    return (f"strict ({STRICT_LIMIT} req/s, rate = {STRICT_RATE:.0f}, {args.strict_duration:.0f} s): 429s after the "
            f"first {args.settle:.0f} s {100 * limited / max(1, n):.2f}% (target < 5%) of {n} requests, "
            f"{ok:.2f} req/s answered; in the first {args.settle:.0f} s {limited0} of {n0}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of the ixon scenario (default 120)")
    parser.add_argument("--strict-duration", type=float, default=120.0, help="seconds of the strict scenario")
    parser.add_argument("--settle", type=float, default=30.0, help="strict: seconds left out of the 429 share")
    parser.add_argument("--only", choices=["ixon", "strict"], default="")
    parser.add_argument("--agents", type=int, default=150, help="ixon: agents (2 streams each, every 2 s)")
    parser.add_argument("--rate", type=float, default=0.0, help="ixon: `rate` in the config (default: the connector's)")
    parser.add_argument("--burst", type=int, default=0, help="ixon: `burst` in the config (default: the connector's)")
    parser.add_argument("--concurrency", type=int, default=4, help="`concurrency` in the config (default 4)")
    parser.add_argument("--slice", type=float, default=10.0, help="seconds per slice of the timeline (default 10)")
    parser.add_argument("--keep", default="", help="keep data, config and daemon logs in this directory")
    args = parser.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_budget."))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if args.only != "strict":
            print(ixon(args, tmp), flush=True)
        if args.only != "ixon":
            print(strict(args, tmp), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
