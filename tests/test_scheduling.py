"""When stream jobs first run: a stable phase per stream, spread over the interval."""

from __future__ import annotations

from syncd.scheduler import FIRST_RUN_SPREAD_S, PHASE_TICK_S, phase_start


def test_ten_thousand_streams_spread_evenly_over_the_interval_and_keep_their_phase() -> None:
    now = 1_760_000_000.25
    starts = [phase_start(f"lynx:log/{i}", 60.0, now) - now for i in range(10_000)]
    assert all(0 <= s < 60 for s in starts)
    per_second = [0] * 60
    for s in starts:
        per_second[int(s)] += 1
    assert max(per_second) < 2 * 10_000 / 60  # no burst: every second holds less than twice its share
    # a restart 17.5 s later (or any time) keeps each stream at the same wall-clock phase
    later = now + 17.5
    assert all((phase_start(f"lynx:log/{i}", 60.0, later) - phase_start(f"lynx:log/{i}", 60.0, now)) % 60 < 1e-6
               for i in range(100))


def test_a_long_interval_still_starts_within_the_spread() -> None:
    now = 1_760_000_000.0
    starts = [phase_start(f"s:{i}", 3600.0, now) - now for i in range(1000)]
    assert max(starts) < FIRST_RUN_SPREAD_S and min(starts) >= 0


def test_phases_lie_on_the_tick_grid_so_streams_due_together_start_in_one_wakeup() -> None:
    now = 1_760_000_000.3
    starts = {phase_start(f"lynx:log/{i}", 60.0, now) for i in range(10_000)}
    ticks = round(60 / PHASE_TICK_S)
    assert all(abs(s / PHASE_TICK_S - round(s / PHASE_TICK_S)) < 1e-6 for s in starts)  # wall-clock multiples
    assert len(starts) == ticks  # 10,000 streams share the 240 quarter seconds of the minute, every one used
    # an interval under the tick: one phase, at once; one not a multiple of it: ticks that fit inside it
    assert phase_start("x", 0.1, now) - now < 0.1
    assert all(0 <= phase_start(f"s:{i}", 7.3, now) - now < 7.3 for i in range(1000))
