"""`syncd demo`: a live table per vendor on a terminal, progress lines and one final table otherwise, then the summary."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from syncd.sim.broker import mosquitto_binary
from syncd.sources import SOURCES
from tests.helpers import syncd

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def vendors() -> list[str]:
    return sorted(v for v in SOURCES if v != "navixy" or mosquitto_binary())  # navixy pushes through a broker


def final_table(text: str) -> tuple[list[list[str]], list[str], str]:
    """The ended table's vendor rows, its footer row and the line under it."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if "syncd demo · " in line and "ended" in line)  # the last frame
    body: list[list[str]] = []
    for i, line in enumerate(lines[start + 1:], start + 1):
        if line.startswith("└"):
            return body[:-1], body[-1], lines[i + 1]
        if line.startswith("│"):
            body.append([cell.strip() for cell in line.split("│")[1:-1]])
    raise AssertionError(text)


def check_end(text: str) -> None:
    rows, footer, under = final_table(text)
    assert [r[0] for r in rows] == vendors(), rows
    numbers = [[int(c.replace(",", "")) for c in (r[1], r[2], r[5], r[6])] for r in rows]
    assert all(streams > 0 and events > 0 and failing == errors == 0 for streams, events, failing, errors in numbers), rows
    streams, events = sum(n[0] for n in numbers), sum(n[1] for n in numbers)
    assert footer[0] == "all" and footer[1:3] == [str(streams), f"{events:,}"] and footer[5:] == ["0", "0"], footer
    assert under == f"ClickHouse {events:,} stored · MQTT off (--mqtt URL publishes too) · spool 0.0 MB"  # all flushed
    assert f"\nstreams: {streams}/{streams} healthy; dead letters: 0\n" in text
    assert "summary (read back from ClickHouse, events FINAL):" in text


def test_not_a_terminal_prints_progress_lines_then_the_final_table(tmp_path: Path) -> None:
    run = syncd("demo", "--duration", "5", "--data-dir", str(tmp_path / "demo"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\x1b[" not in run.stdout  # no cursor movement, no colour in a log
    progress = [line for line in run.stdout.splitlines() if line.startswith("[")]
    assert len(progress) >= 4 and all(re.match(r"^\[\s*\d+\.\ds\] fetched\s+\d+\s+stored", p) for p in progress), progress
    check_end(run.stdout)


def test_a_terminal_gets_a_live_table(tmp_path: Path) -> None:
    master, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "syncd", "demo", "--duration", "5", "--data-dir", str(tmp_path / "d")],
                            stdin=subprocess.DEVNULL, stdout=child, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TERM": "xterm-256color"})
    os.close(child)
    chunks = []
    while True:  # read until the child closes the terminal (EIO), so its writes never block
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    raw = b"".join(chunks).decode()
    assert "\x1b[?25l" in raw and "\x1b[?25h" in raw  # rich.live hid the cursor while redrawing, then showed it
    assert raw.count("syncd demo · ") >= 4  # redrawn, not printed once
    text = ANSI.sub("", raw).replace("\r", "")
    assert not re.search(r"^\[\s*\d+\.\ds\] fetched", text, re.M)  # no scrolling lines on a terminal
    check_end(text)
