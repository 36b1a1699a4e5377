"""`syncd sim`: serve the vendor simulators, print where, optionally write a syncd config that uses them."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import tomllib
from pathlib import Path
from typing import Any

from syncd.sim.common import VendorSim, start_sims

# vendor → (module, class); imported on demand so one broken simulator never hides the others
REGISTRY: dict[str, tuple[str, str]] = {
    "iotopen": ("syncd.sim.iotopen", "IotOpenSim"),
    "proxus": ("syncd.sim.proxus", "ProxusSim"),
    "ioto": ("syncd.sim.ioto", "IotoSim"),
    "ixon": ("syncd.sim.ixon", "IxonSim"),
    "navixy": ("syncd.sim.navixy", "NavixySim"),
}


def sim_class(vendor: str) -> type[VendorSim]:
    module, name = REGISTRY[vendor]
    cls: type[VendorSim] = getattr(importlib.import_module(module), name)
    return cls


def make_sims(vendors: list[str], seed: int = 1, live: bool = False,
              options: dict[str, dict[str, Any]] | None = None) -> list[VendorSim]:
    options = options or {}
    return [sim_class(v)(seed, live=live, **options.get(v, {})) for v in vendors]  # type: ignore[call-arg]


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """`iotopen.log_points=200000` → {"iotopen": {"log_points": 200000}} (values read as TOML literals)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        vendor, _, option = key.partition(".")
        if vendor not in REGISTRY or not option or not value:
            raise SystemExit(f"bad --option {item!r}: expected VENDOR.KEY=VALUE with VENDOR in {sorted(REGISTRY)}")
        try:
            parsed: Any = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        out.setdefault(vendor, {})[option] = parsed
    return out


def config_toml(sims: list[VendorSim], data_dir: str = "./data") -> str:
    """A syncd configuration that syncs every given simulator (used by `syncd sim --write-config`)."""
    lines = ["[syncd]", f'data_dir = "{data_dir}"', 'http = ""', ""]
    for sim in sims:
        lines.append("[[sources]]")
        lines.append(f'name = "{sim.vendor}-sim"')
        for key, value in sim.source_config().items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append('interval = "5s"')
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


async def serve(args: argparse.Namespace) -> int:
    vendors = list(REGISTRY) if args.vendors == "all" else [v.strip() for v in args.vendors.split(",")]
    sims = make_sims(vendors, args.seed, args.live, parse_options(args.option))
    ports = [args.port + i for i in range(len(sims))] if args.port else None
    runners = await start_sims(sims, args.host, ports)
    for sim in sims:
        print(f"{sim.vendor:8} {sim.url}", flush=True)
    if args.write_config:
        Path(args.write_config).write_text(config_toml(sims))
        Path(args.write_config).chmod(0o600)  # it holds credentials (the simulators')
        print(f"config written to {args.write_config}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in runners:
        await r.cleanup()
    return 0
