"""Checks beyond validation that `syncd check` reports as warnings (they do not fail the config)."""

from __future__ import annotations

from syncd.settings import Settings


def warnings(settings: Settings) -> list[str]:
    out = []
    if not settings.sources:
        out.append("no [[sources]] configured: syncd has nothing to sync")
    for i, s in enumerate(settings.sources):
        if s.interval < 1:
            out.append(f"sources[{i}].interval: {s.interval}s is very short; vendors may rate-limit")
    return out
