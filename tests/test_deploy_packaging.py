"""Packaging: the Dockerfile, the systemd unit and its environment file, Grafana provisioning and every dashboard query.

There is no Docker daemon here: the Dockerfile is read, its build context assembled the way Docker would (with
.dockerignore), the wheel built from that context, and its HEALTHCHECK command run against a live daemon.
The systemd unit goes through `systemd-analyze verify` and `security`. Every Grafana panel and variable query is
expanded the way the ClickHouse plugin and Grafana expand them and run on the embedded engine after a real sync.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncd.app import FLUSH_TIMEOUT, INFLIGHT_TIMEOUT
from syncd.settings import load
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim
from syncd.sim.proxus import ProxusSim
from tests.conftest import free_port
from tests.helpers import ch, syncd, write_config

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "systemd" / "syncd.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "syncd.env.example"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "syncd-overview.json"
VENV_SYNCD = Path(sys.executable).parent / "syncd"


# -- Dockerfile ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    steps: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.steps if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def dockerfile_stages(text: str) -> list[Stage]:
    """Instructions per stage; ARGs declared before the first FROM are substituted in FROM lines, as Docker does."""
    steps: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        steps.append((keyword.upper(), args.strip()))
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in steps:
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], args).split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else "", []))
        elif stages:
            stages[-1].steps.append((keyword, args))
    return stages


def image_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def healthcheck_command(stage: Stage) -> list[str]:
    options, _, command = stage.last("HEALTHCHECK").partition("CMD ")
    assert options.split() == ["--interval=30s", "--timeout=5s", "--start-period=60s", "--retries=3"]
    argv: list[str] = json.loads(command)  # the exec form: no shell in between
    return argv


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, pattern) in file order; `**` any number of directories, `*` and `?` within one."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(rx)))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return not excluded


def build_context_files(stage: Stage) -> list[str]:
    """Every file the stage's COPY instructions take from the context, as Docker would send it."""
    rules = dockerignore_rules()
    files: list[str] = []
    for args in stage.all("COPY"):
        words = args.split()
        if words[0].startswith("--from="):
            continue
        for source in words[:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            files += [p.relative_to(ROOT).as_posix() for p in found]
    return [f for f in files if in_build_context(f, rules)]


def test_dockerfile_builds_in_one_stage_and_runs_as_a_user_on_a_slim_one() -> None:
    build, runtime = dockerfile_stages(DOCKERFILE.read_text())
    assert build.name == "build" and runtime.name == "runtime"
    assert build.base == runtime.base == "python:3.11-slim-bookworm"  # the venv's python links to the same path
    assert any("pip wheel" in r and "python -m venv /opt/syncd" in r for r in build.all("RUN"))
    assert runtime.all("COPY") == ["--from=build /opt/syncd /opt/syncd"]  # nothing built in the runtime stage
    user = runtime.last("USER")
    assert user == "10001:10001" and user.split(":")[0] not in ("0", "root")
    assert [kw for kw, _ in runtime.steps].index("USER") > [kw for kw, _ in runtime.steps].index("RUN")
    assert json.loads(runtime.last("ENTRYPOINT")) == ["syncd"]
    assert json.loads(runtime.last("CMD")) == ["run", "--config", "/etc/syncd/syncd.toml"]
    assert json.loads(runtime.last("VOLUME")) == ["/var/lib/syncd"]
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    argv = healthcheck_command(runtime)
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2]
    # the image's environment is a valid configuration: the data dir is the volume, the endpoint the exposed port
    env = image_env(runtime)
    settings = load(None, env=env)
    assert settings.syncd.data_dir == Path("/var/lib/syncd")
    assert settings.syncd.http == "0.0.0.0:9108" and runtime.last("EXPOSE") == "9108"
    assert settings.syncd.log_format == "json"
    assert env["PATH"].startswith("/opt/syncd/bin:")


def test_dockerfile_copies_only_what_is_in_the_build_context() -> None:
    build, _ = dockerfile_stages(DOCKERFILE.read_text())
    files = build_context_files(build)
    assert "pyproject.toml" in files and "README.md" in files and "syncd/cli.py" in files
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "syncd").rglob("*.py")}
    assert sources <= set(files)  # every module reaches the build
    rules = dockerignore_rules()
    for left_out in (".venv/bin/python", "data/state.db", ".git/config", "tests/helpers.py", "config/example.toml",
                     "syncd/__pycache__/cli.cpython-311.pyc", "syncd/sources/__pycache__/base.cpython-311.pyc"):
        assert not in_build_context(left_out, rules), left_out


def test_the_build_context_makes_a_wheel_with_the_syncd_command(tmp_path: Path) -> None:
    """The builder stage's `pip wheel .`, run on exactly the files Docker would send."""
    build, _ = dockerfile_stages(DOCKERFILE.read_text())
    context = tmp_path / "context"
    files = build_context_files(build)
    for name in files:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"),
                        str(context)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("syncd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "syncd = syncd.cli:main" in zf.read(entry_points).decode()
    assert {n for n in names if n.startswith("syncd/")} == {f for f in files if f.startswith("syncd/")}


def test_the_healthcheck_passes_on_a_live_daemon_and_fails_without_one(tmp_path: Path) -> None:
    """The HEALTHCHECK command itself, with the image's environment, against `syncd run` on the image's address."""
    _, runtime = dockerfile_stages(DOCKERFILE.read_text())
    argv = healthcheck_command(runtime)
    port = free_port()
    env = {**image_env(runtime), "PATH": str(Path(sys.executable).parent), "SYNCD_SYNCD__DATA_DIR": str(tmp_path / "data"),
           "SYNCD_SYNCD__HTTP": f"0.0.0.0:{port}"}
    cfg = tmp_path / "syncd.toml"
    cfg.write_text("[syncd]\ninstance = \"healthcheck\"\n")
    cfg.chmod(0o600)

    def healthcheck() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=10)

    daemon = subprocess.Popen([sys.executable, "-m", "syncd", *json.loads(runtime.last("CMD"))[:2], str(cfg)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        check = healthcheck()
        while check.returncode != 0 and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the daemon binds its port once the store is open
            check = healthcheck()
        assert check.returncode == 0, check.stderr[-2000:]
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 0 and '"syncd.stopped"' in err, err[-3000:]
    down = healthcheck()
    assert down.returncode == 1 and "Connection refused" in down.stderr, down.stderr[-2000:]


# -- systemd ------------------------------------------------------------------------------------------------------


def unit_for_this_machine() -> str:
    """The unit with its commands pointed at this virtualenv's `syncd` (verify insists the binary exists)."""
    text = UNIT.read_text()
    assert text.count("/opt/syncd/bin/syncd ") == 2  # ExecStartPre (check) and ExecStart (run)
    return text.replace("/opt/syncd/bin/syncd ", f"{VENV_SYNCD} ")


def verify(text: str, where: Path) -> list[str]:
    """`systemd-analyze verify`: every line it says about the unit, and its exit status when not 0.

    It exits 0 on unknown keys and unparsable values (it only warns), so the warnings count as failures too.
    """
    where.mkdir(parents=True, exist_ok=True)
    unit = where / "syncd.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "syncd.service" in line]
    return problems + ([f"exit status {r.returncode}"] if r.returncode else [])


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_passes_verify_and_broken_copies_do_not(tmp_path: Path) -> None:
    assert VENV_SYNCD.is_file()
    good = unit_for_this_machine()
    assert verify(good, tmp_path / "good") == []
    missing = tmp_path / "nowhere" / "syncd"
    broken = {
        "binary missing": good.replace(f"ExecStart={VENV_SYNCD} ", f"ExecStart={missing} "),
        "misspelt key": good.replace("\nNoNewPrivileges=yes\n", "\nNoNewPrivilege=yes\n"),
        "bad value": good.replace("\nProtectSystem=strict\n", "\nProtectSystem=stricter\n"),
        "unknown section": good.replace("\n[Service]\n", "\n[Servcie]\n"),
    }
    for what, text in broken.items():
        assert text != good, what
        problems = verify(text, tmp_path / what.replace(" ", "-"))
        assert problems, f"systemd-analyze verify accepted a unit with a {what}"


def test_systemd_unit_is_hardened_and_waits_for_the_drain(tmp_path: Path) -> None:
    s = unit_settings()
    for key, value in {"DynamicUser": "yes", "StateDirectory": "syncd", "ProtectSystem": "strict",
                       "NoNewPrivileges": "yes", "Restart": "on-failure", "KillSignal": "SIGTERM",
                       "EnvironmentFile": "-/etc/syncd/syncd.env", "Type": "exec",
                       "LoadCredential": "syncd.toml:/etc/syncd/syncd.toml"}.items():
        assert s[key] == [value], key
    assert s["ExecStart"] == ["/opt/syncd/bin/syncd run --config %d/syncd.toml"]
    # SIGTERM waits for in-flight pages, then drains the spool, each bounded: the stop timeout covers both
    (stop,) = s["TimeoutStopSec"]
    assert int(stop) >= INFLIGHT_TIMEOUT + FLUSH_TIMEOUT + 30
    unit = tmp_path / "syncd.service"
    unit.write_text(unit_for_this_machine())
    # exposure on systemd's 0-100 scale (shown as 0.0-10.0): at most 2.0 ("OK")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def env_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(active NAME=value lines, commented-out SYNCD_ overrides) of an EnvironmentFile example."""
    active: dict[str, str] = {}
    offered: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"(#?)([A-Z_][A-Z0-9_]*)=(.*)", line)
        if m:
            (offered if m.group(1) else active)[m.group(2)] = m.group(3)
    return active, offered


def differences(a: Any, b: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            yield from differences(a.get(key), b.get(key), (*path, key))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, (*path, i))
    elif a != b:
        yield path


def test_env_example_holds_every_secret_the_example_config_names_and_each_override_lands(tmp_path: Path) -> None:
    example = ROOT / "config" / "example.toml"
    secrets, overrides = env_file(ENV_EXAMPLE)
    assert set(secrets) == set(re.findall(r"\$\{(\w+)\}", example.read_text()))
    assert len(overrides) >= 10 and all(name.startswith("SYNCD_") for name in overrides)
    base = load(example, env=secrets)
    names = [s.name.lower().replace("-", "_") for s in base.sources]
    for name, value in overrides.items():
        section, *rest = name.removeprefix("SYNCD_").lower().split("__")
        where: tuple[Any, ...] = (section, *rest) if section != "sources" else (section, names.index(rest[0]), rest[1])
        changed = load(example, env={**secrets, name: value})
        assert list(differences(base.model_dump(), changed.model_dump())) == [where], name


# -- Grafana ------------------------------------------------------------------------------------------------------
#
# How a panel's SQL reaches ClickHouse, ported from the sources (cited so a plugin upgrade can be checked against them):
# 1. the plugin's frontend, CHDatasource.applyTemplateVariables (grafana/clickhouse-datasource src/data/CHDatasource.ts):
#    `$__conditionalAll(cond, $var)` first (applyConditionalAll + getMacroArgs: `1=1` when the variable is All or
#    empty, else `cond`), then Grafana's template service with the plugin's `format` (an array becomes 'a','b').
#    Grafana's variable syntax is `variableRegex` (grafana public/app/features/variables/utils.ts) and the
#    `singlequote` format is `'v'` joined by `,` with `'` escaped as `\'` (grafana/scenes formatRegistry.ts).
# 2. the plugin's backend, pkg/macros/macros.go (Interpolate over macropro): `$__name` or `$__name(args)`, arguments
#    split at top-level commas and trimmed, nested macros expanded innermost first, and
#      $__timeFilter(c)     c >= toDateTime(from_s) AND c <= toDateTime(to_s)
#      $__timeFilter_ms(c)  c >= fromUnixTimestamp64Milli(from_ms) AND c <= fromUnixTimestamp64Milli(to_ms)
#      $__timeFrom(c) / $__timeTo(c)      c >= toDateTime(from_s) / c <= toDateTime(to_s)
#      $__dateFilter(c)     c >= toDate('from day') AND c <= toDate('to day')
#      $__dateTimeFilter(d, t) = $__dt(d, t)   (date filter on d) AND (time filter on t)
#      $__fromTime, $__toTime            toDateTime(s);  $__fromTime_ms, $__toTime_ms  fromUnixTimestamp64Milli(ms)
#      $__timeInterval(c)   toStartOfInterval(toDateTime(c), INTERVAL max(interval_s, 1) second)
#      $__timeInterval_ms(c) toStartOfInterval(toDateTime64(c, 3), INTERVAL max(interval_ms, 1) millisecond)
#      $__timeGroup(c, 5m)  toStartOfInterval(toDateTime(c), INTERVAL 300 second)
#      $__interval_s        max(interval_s, 1)
#    The plugin's README table ("Macros") lists the same set; its pkg/macros/macros_test.go cases are replayed below.


@dataclass(frozen=True)
class TimeRange:
    from_ms: int
    to_ms: int
    interval_ms: int


ALL = "$__all"


@dataclass(frozen=True)
class Variable:
    options: list[str]  # what the variable's query returned
    current: list[str] | str  # the selection, or ALL


def _seconds(ms: int) -> str:
    return f"toDateTime({ms // 1000})"


def _millis(ms: int) -> str:
    return f"fromUnixTimestamp64Milli({ms})"


def _day(ms: int) -> str:
    return f"toDate('{datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d}')"


def _go_duration_s(text: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m|h)", text.strip("'\" "))
    if not m:
        raise ValueError(f"$__timeGroup: invalid interval {text!r}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def _arity(n: int, fn: Callable[[TimeRange, list[str]], str]) -> Callable[[TimeRange, list[str]], str]:
    def checked(r: TimeRange, args: list[str]) -> str:
        if len(args) != n:
            raise ValueError(f"expected {n} argument(s), received {len(args)}")
        return fn(r, args)
    return checked


MACROS: dict[str, Callable[[TimeRange, list[str]], str]] = {
    "fromTime": lambda r, a: _seconds(r.from_ms),
    "toTime": lambda r, a: _seconds(r.to_ms),
    "fromTime_ms": lambda r, a: _millis(r.from_ms),
    "toTime_ms": lambda r, a: _millis(r.to_ms),
    "timeFilter": _arity(1, lambda r, a: f"{a[0]} >= {_seconds(r.from_ms)} AND {a[0]} <= {_seconds(r.to_ms)}"),
    "timeFilter_ms": _arity(1, lambda r, a: f"{a[0]} >= {_millis(r.from_ms)} AND {a[0]} <= {_millis(r.to_ms)}"),
    "timeFrom": _arity(1, lambda r, a: f"{a[0]} >= {_seconds(r.from_ms)}"),
    "timeTo": _arity(1, lambda r, a: f"{a[0]} <= {_seconds(r.to_ms)}"),
    "dateFilter": _arity(1, lambda r, a: f"{a[0]} >= {_day(r.from_ms)} AND {a[0]} <= {_day(r.to_ms)}"),
    "dateTimeFilter": _arity(2, lambda r, a: f"({a[0]} >= {_day(r.from_ms)} AND {a[0]} <= {_day(r.to_ms)}) AND "
                                             f"({a[1]} >= {_seconds(r.from_ms)} AND {a[1]} <= {_seconds(r.to_ms)})"),
    "timeInterval": _arity(1, lambda r, a: f"toStartOfInterval(toDateTime({a[0]}), "
                                           f"INTERVAL {max(r.interval_ms // 1000, 1)} second)"),
    "timeInterval_ms": _arity(1, lambda r, a: f"toStartOfInterval(toDateTime64({a[0]}, 3), "
                                              f"INTERVAL {max(r.interval_ms, 1)} millisecond)"),
    "timeGroup": _arity(2, lambda r, a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {_go_duration_s(a[1])} second)"),
    "interval_s": lambda r, a: str(max(r.interval_ms // 1000, 1)),
}
MACROS["dt"] = MACROS["dateTimeFilter"]


def macro_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """Raw arguments of the call whose `(` is at open_paren, split at top-level commas; and the index after `)`."""
    depth, start = 0, open_paren + 1
    args: list[str] = []
    for i in range(open_paren, len(sql)):
        if sql[i] == "(":
            depth += 1
        elif sql[i] == ")":
            depth -= 1
            if depth == 0:
                return [*args, sql[start:i]], i + 1
        elif sql[i] == "," and depth == 1:
            args.append(sql[start:i])
            start = i + 1
    raise ValueError(f"unbalanced parentheses after {sql[:open_paren]!r}")


def expand_macros(sql: str, r: TimeRange) -> str:
    """The backend step: the last macro first, so a macro's arguments never hold one still to expand."""
    while (found := list(re.finditer(r"\$__(\w+)", sql))):
        m = found[-1]
        if m.group(1) not in MACROS:
            raise ValueError(f"$__{m.group(1)} is not a ClickHouse plugin macro: {sql!r}")
        args: list[str] = []
        end = m.end()
        if sql.startswith("(", m.end()):
            raw, end = macro_args(sql, m.end())
            args = [a.strip() for a in raw]
        sql = sql[: m.start()] + MACROS[m.group(1)](r, args) + sql[end:]
    return sql


def apply_conditional_all(sql: str, variables: dict[str, Variable]) -> str:
    """CHDatasource.applyConditionalAll: from the last `$__conditionalAll(` back to the first."""
    macro = "$__conditionalAll("
    while (at := sql.rfind(macro)) != -1:
        params, _ = macro_args(sql, at + len(macro) - 1)
        if len(params) != 2:
            return sql  # as the plugin does: left for the backend, which refuses it
        phrase = params[0]
        name = re.search(r"(?<=\$\{)\w+(?=\})|(?<=\$)\w+", params[1].strip())
        if name and name.group(0) in variables:
            current = variables[name.group(0)].current
            if current == ALL or current == []:
                phrase = "1=1"
        sql = sql.replace(f"{macro}{params[0]},{params[1]})", phrase, 1)
    return sql


def single_quote(values: list[str]) -> str:
    return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)


def interpolate_variables(sql: str, variables: dict[str, Variable]) -> str:
    """Grafana's template service with the plugin's format; names that are no variable are left as they are."""
    pattern = r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if name not in variables:
            return m.group(0)
        var = variables[name]
        values = var.options if var.current == ALL else list(var.current)
        if fmt is None:
            return "'" + "','".join(values) + "'"  # the plugin's format for a multi-value variable, no escaping
        assert fmt == "singlequote", f"format {fmt} is not expanded here"
        return single_quote(values)

    return re.sub(pattern, sub, sql)


def grafana_sql(raw: str, r: TimeRange, variables: dict[str, Variable]) -> str:
    sql = expand_macros(interpolate_variables(apply_conditional_all(raw, variables), variables), r)
    assert "$" not in sql, f"left unexpanded: {sql}"
    return sql


# The plugin's own expectations (pkg/macros/macros_test.go): from 2014-11-12T11:45:26.123Z to 2015-11-12T11:45:26.456Z
PLUGIN_RANGE = TimeRange(1415792726123, 1447328726456, 60_000)
PLUGIN_CASES = [
    ("select * from foo where $__timeFilter(cast(sth as timestamp) )",
     "select * from foo where cast(sth as timestamp) >= toDateTime(1415792726) AND cast(sth as timestamp) <= "
     "toDateTime(1447328726)"),
    ("select * from foo where $__timeFilter_ms(cast(sth as timestamp))",
     "select * from foo where cast(sth as timestamp) >= fromUnixTimestamp64Milli(1415792726123) AND "
     "cast(sth as timestamp) <= fromUnixTimestamp64Milli(1447328726456)"),
    ("select * from foo where ( date >= $__fromTime ) and ( date <= $__toTime ) limit 100",
     "select * from foo where ( date >= toDateTime(1415792726) ) and ( date <= toDateTime(1447328726) ) limit 100"),
    ("select * from foo where ( date >= $__fromTime_ms and date <= $__toTime_ms ) limit 100",
     "select * from foo where ( date >= fromUnixTimestamp64Milli(1415792726123) and date <= "
     "fromUnixTimestamp64Milli(1447328726456) ) limit 100"),
    ("SELECT $__timeInterval($__fromTime) AS from_time",
     "SELECT toStartOfInterval(toDateTime(toDateTime(1415792726)), INTERVAL 60 second) AS from_time"),
    ("SELECT $__timeInterval_ms($__fromTime_ms)",
     "SELECT toStartOfInterval(toDateTime64(fromUnixTimestamp64Milli(1415792726123), 3), INTERVAL 60000 millisecond)"),
    ("select * from foo where $__timeFilter(coalesce(closed_at, $__toTime))",
     "select * from foo where coalesce(closed_at, toDateTime(1447328726)) >= toDateTime(1415792726) AND "
     "coalesce(closed_at, toDateTime(1447328726)) <= toDateTime(1447328726)"),
    ("$__dateFilter(dateCol)", "dateCol >= toDate('2014-11-12') AND dateCol <= toDate('2015-11-12')"),
    ("$__dateTimeFilter(dateCol, timeCol)",
     "(dateCol >= toDate('2014-11-12') AND dateCol <= toDate('2015-11-12')) AND "
     "(timeCol >= toDateTime(1415792726) AND timeCol <= toDateTime(1447328726))"),
    ("$__dt(dateCol, timeCol)",
     "(dateCol >= toDate('2014-11-12') AND dateCol <= toDate('2015-11-12')) AND "
     "(timeCol >= toDateTime(1415792726) AND timeCol <= toDateTime(1447328726))"),
    ("$__timeFrom(ts) AND $__timeTo(ts)", "ts >= toDateTime(1415792726) AND ts <= toDateTime(1447328726)"),
    ("$__timeGroup(ts, 5m)", "toStartOfInterval(toDateTime(ts), INTERVAL 300 second)"),
    ("$__interval_s", "60"),
]


@pytest.mark.parametrize(("raw", "expanded"), PLUGIN_CASES)
def test_macros_expand_as_the_plugin_expands_them(raw: str, expanded: str) -> None:
    assert expand_macros(raw, PLUGIN_RANGE) == expanded


def test_variables_and_conditional_all_expand_as_grafana_and_the_plugin_do() -> None:
    variables = {"vendor": Variable(["iotopen", "o'brien"], ALL), "source": Variable(["a", "b"], ["b"])}
    sql = ("x WHERE $__conditionalAll(vendor IN (${vendor:singlequote}), $vendor) "
           "AND $__conditionalAll(source IN (${source:singlequote}), ${source}) AND v IN ($vendor) AND $__interval_s")
    assert interpolate_variables(apply_conditional_all(sql, variables), variables) == (
        "x WHERE 1=1 AND source IN ('b') AND v IN ('iotopen','o'brien') AND $__interval_s")
    assert single_quote(["o'brien"]) == "'o\\'brien'"
    with pytest.raises(ValueError, match="not a ClickHouse plugin macro"):
        expand_macros("SELECT $__timeFilterMs(ts)", PLUGIN_RANGE)
    with pytest.raises(ValueError, match="expected 1 argument"):
        expand_macros("SELECT $__timeFilter_ms(ts, at)", PLUGIN_RANGE)


def dashboard_queries() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(variable name, SQL) of each templating query and (panel title, SQL) of each panel target."""
    board = json.loads(DASHBOARD.read_text())
    variables = [(v["name"], v["query"]["rawSql"]) for v in board["templating"]["list"]]
    panels = [(p["title"], t["rawSql"]) for p in board["panels"] for t in p["targets"]]
    return variables, panels


def test_grafana_provisioning_names_the_data_source_every_query_uses() -> None:
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "syncd-clickhouse.yaml").read_text())["datasources"]
    assert ds["type"] == "grafana-clickhouse-datasource" and ds["jsonData"]["defaultDatabase"] == "syncd"
    assert ds["jsonData"]["protocol"] == "native" and ds["secureJsonData"]["password"] == "${CLICKHOUSE_GRAFANA_PASSWORD}"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "syncd.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    board = json.loads(DASHBOARD.read_text())
    wanted = {"type": ds["type"], "uid": ds["uid"]}
    used = [p["datasource"] for p in board["panels"]] + [t["datasource"] for p in board["panels"] for t in p["targets"]]
    used += [v["datasource"] for v in board["templating"]["list"]]
    assert used and all(d == wanted for d in used)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    # every time column is DateTime64(3): second-precision macros would cut up to 999 ms off each end of the range
    _, panels = dashboard_queries()
    for title, sql in panels:
        assert not re.search(r"\$__(timeFilter|timeInterval|fromTime|toTime|timeFrom|timeTo|timeGroup)\b", sql), title


def test_every_dashboard_query_runs_on_the_schema_after_a_sync(tmp_path: Path) -> None:
    iotopen = IotOpenSim(seed=31, installations=2, topics_per_installation=4, log_points=2000, poison="ts_9999")
    proxus = ProxusSim(seed=32)
    with sims_in_thread([iotopen, proxus]):
        cfg = write_config(tmp_path, [iotopen, proxus])
        r = syncd("run", "--config", str(cfg), "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    data = tmp_path / "data"
    dead = [p for p in iotopen.poisoned if p.field is not None]
    assert len(dead) >= 1

    now_ms = int(time.time() * 1000)
    day = TimeRange(now_ms - 86_400_000, now_ms, 60_000)  # the default range; Grafana's interval for it on ~1,400 px
    zoomed = TimeRange(now_ms - 900_000, now_ms, 500)  # the last 15 minutes: a sub-second interval
    var_sql, panels = dashboard_queries()
    assert [name for name, _ in var_sql] == ["vendor", "source"] and len(panels) == 9

    # the variables' own queries, each with the variables before it set to All
    options: dict[str, Variable] = {}
    for name, sql in var_sql:
        (rows,) = ch(data, grafana_sql(sql, day, options))
        options[name] = Variable([row[0] for row in rows], ALL)
    assert options["vendor"].options == ["iotopen", "proxus"]
    assert options["source"].options == ["iotopen-sim", "proxus-sim"]

    selections = {
        "all": options,
        "proxus": {**options, "vendor": Variable(options["vendor"].options, ["proxus"])},
    }
    runs = [(label, r, title, grafana_sql(sql, r, selections[label])) for label in selections for r in (day, zoomed)
            for title, sql in panels]
    f, t = day.from_ms, day.to_ms
    in_day = f"toUnixTimestamp64Milli(ts) BETWEEN {f} AND {t}"
    truth_sql = [
        f"SELECT vendor, count() FROM syncd.events WHERE {in_day} GROUP BY vendor ORDER BY vendor",
        f"SELECT vendor, count() FROM syncd.events FINAL WHERE {in_day} GROUP BY vendor ORDER BY vendor",
        "SELECT count(), countIf(vendor = 'proxus'), countIf(ok = 0) FROM syncd.sync_status FINAL",
        "SELECT count(), countIf(vendor = 'proxus') FROM syncd.latest FINAL WHERE kind IN ('status', 'telemetry')",
        f"SELECT count(), countIf(vendor = 'proxus') FROM syncd.events FINAL WHERE kind = 'alert' AND {in_day}",
        f"SELECT count() FROM syncd.dead_letter FINAL WHERE toUnixTimestamp64Milli(at) BETWEEN {f} AND {t}",
    ]
    results = ch(data, *(sql for *_, sql in runs), *truth_sql)
    assert len(results) == len(runs) + len(truth_sql)  # every panel query ran
    raw_counts, final_counts, status, latest, alerts, dead_rows = results[len(runs):]
    raw = dict(map(tuple, raw_counts))
    final = dict(map(tuple, final_counts))
    assert set(final) == {"iotopen", "proxus"} and dead_rows == [[len(dead)]]
    got = {(label, r, title): rows for (label, r, title, _), rows in zip(runs, results[:len(runs)], strict=True)}

    for label, vendors in (("all", ["iotopen", "proxus"]), ("proxus", ["proxus"])):
        series = got[(label, day, "Events per second by vendor (event time)")]
        assert series and sorted({row[1] for row in series}) == vendors
        per_vendor = {v: round(sum(row[2] for row in series if row[1] == v) * 60) for v in vendors}
        assert per_vendor == {v: raw[v] for v in vendors}  # count() / $__interval_s, summed over intervals × 60 s
        assert got[(label, day, "Events in range")] == [[sum(final[v] for v in vendors)]]
        assert got[(label, day, "Unhealthy streams")] == [[0]] and status[0][2] == 0
        assert len(got[(label, day, "Largest lag")]) == 1
        assert len(got[(label, day, "Stream health (latest run per stream)")]) == status[0][0 if label == "all" else 1]
        assert {row[1] for row in got[(label, day, "Stream health (latest run per stream)")]} == set(vendors)
        assert len(got[(label, day, "Current state (newest value per device and metric)")]) == min(
            500, latest[0][0 if label == "all" else 1])
        assert len(got[(label, day, "Alerts")]) == min(500, alerts[0][0 if label == "all" else 1]) > 0
        expected_dead = len(dead) if label == "all" else 0  # the poisoned records are IoT Open's
        assert got[(label, day, "Dead letters in range")] == [[expected_dead]]
        assert len(got[(label, day, "Newest dead letters")]) == expected_dead
    # zoomed in: half-second buckets, every bucket inside the last 15 minutes
    zoomed_series = got[("all", zoomed, "Events per second by vendor (event time)")]
    assert zoomed_series and all(zoomed.from_ms - 500 <= _ms(row[0]) <= zoomed.to_ms for row in zoomed_series)
    assert all(_ms(row[0]) % 500 == 0 for row in zoomed_series)


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)
