"""Configuration: TOML file + SYNCD_ environment overrides, `${NAME}` and `*_file` secrets, strict validation."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from syncd.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$")
_SIZES = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_duration(value: Any) -> float:
    """'500ms', '60s', '15m', '24h', '7d' -> seconds. Bare numbers are refused: units are part of the value."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"must be a duration like '500ms', '60s', '15m', '24h' (got {value!r})")


def parse_size(value: Any) -> int:
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZES[m.group(2)])
    raise ValueError(f"must be a size like '512MiB' or '2GiB' (got {value!r})")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonSettings(_Section):
    data_dir: Path = Path("./data")
    instance: str = "syncd-0"
    shard: str = "0/1"
    http: str = "127.0.0.1:9108"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str) -> str:
        m = re.fullmatch(r"(\d+)/(\d+)", v)
        if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
            raise ValueError("must be 'index/count' with 0 <= index < count, e.g. '0/1'")
        return v

    @property
    def shard_index(self) -> tuple[int, int]:
        i, n = self.shard.split("/")
        return int(i), int(n)


class ClickHouseSettings(_Section):
    dsn: str = ""  # empty: chdb:///<data_dir>/clickhouse
    database: str = Field("syncd", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    cluster: str = ""
    batch_rows: int = Field(50_000, gt=0)
    batch_age: Duration = 2.0
    ttl: str = ""  # e.g. "365 DAY"; empty keeps data forever
    schema_recheck: Duration = 60.0  # a sink stopped on a schema mismatch tries again this often

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if v and not v.startswith(("chdb://", "http://", "https://")):
            raise ValueError("must start with chdb://, http:// or https://")
        return v


class SpoolSettings(_Section):
    max_bytes: Size = 2 * 2**30
    on_full: Literal["block", "drop_oldest"] = "block"


class MqttSettings(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: SecretStr = SecretStr("")
    prefix: str = "syncd"
    qos: Literal[0, 1, 2] = 1
    max_age: Duration = 900.0
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_verify: bool = True
    client_id: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtt:// or mqtts://")
        return v


class SourceBase(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base_url: str = ""
    interval: Duration = 60.0
    start: str = "24h"
    rate: float | None = Field(None, gt=0)
    burst: int | None = Field(None, gt=0)
    concurrency: int = Field(4, gt=0)
    streams: Sequence[str] | None = None  # each vendor narrows it to the kinds its connector knows
    timeout: Duration = 30.0
    tls_verify: bool = True
    enabled: bool = True
    page_size: int | None = Field(None, gt=0)
    auth_recheck: Duration = 60.0  # a refused credential is tried again after this, doubling up to 30 min
    max_retry_after: Duration = 900.0  # a vendor's Retry-After longer than this is cut to it (with a warning)
    late_window: Duration | None = None  # how far back a re-read reaches for late rows (vendor default if unset)
    reconcile_every: Duration | None = None  # how often that re-read runs (vendor default if unset)

    @field_validator("start")
    @classmethod
    def _start(cls, v: str) -> str:
        start_ms(v, 0)  # raises with a clear message
        return v

    @field_validator("interval", "timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:  # "0s" parses, but no schedule or request can run on it
            raise ValueError(f"must be longer than zero (got {v:g} s)")
        return v

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class IotOpenSource(SourceBase):
    vendor: Literal["iotopen"]
    streams: list[Literal["status", "log"]] | None = None  # the kinds this connector syncs
    base_url: str = "https://lynx.iotopen.se"
    api_key: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _creds(self) -> IotOpenSource:
        if self.api_key is None and not (self.username and self.password):
            raise ValueError("needs api_key, or username and password")
        return self


class ProxusSource(SourceBase):
    vendor: Literal["proxus"]
    streams: list[Literal["telemetry", "alert"]] | None = None  # the kinds this connector syncs
    base_url: str = Field(min_length=1)
    username: str
    password: SecretStr
    concurrency: int = Field(2, gt=0)  # a self-hosted edge box: be gentle (brief §4)
    page_size: int | None = Field(None, gt=0, le=50_000)  # telemetry rows per query; maxRows caps at 50 000 [S]


class IotoSource(SourceBase):
    vendor: Literal["ioto"]
    streams: list[Literal["status", "log", "metric", "alert", "connection"]] | None = None  # the kinds this connector syncs
    base_url: str = Field(min_length=1)
    token: SecretStr


class IxonSource(SourceBase):
    vendor: Literal["ixon"]
    streams: list[Literal["telemetry", "alert", "status"]] | None = None  # the kinds this connector syncs
    base_url: str = "https://portal.ixon.cloud/api"
    application_id: str
    company_id: str
    token: SecretStr


class NavixySource(SourceBase):
    vendor: Literal["navixy"]
    streams: list[Literal["telemetry", "status"]] | None = None  # the kinds this connector syncs
    base_url: str = ""
    region: Literal["eu", "us"] = "eu"
    api_key: SecretStr
    mqtt_url: str = ""
    mqtt_username: str = ""
    mqtt_password: SecretStr = SecretStr("")
    topics: list[str] = []

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, v: str) -> str:
        if v and not v.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtt:// or mqtts://")
        return v

    @property
    def api_root(self) -> str:
        return self.base_url or f"https://api.{self.region}.navixy.com/v2"


SourceSettings = Annotated[
    IotOpenSource | ProxusSource | IotoSource | IxonSource | NavixySource, Field(discriminator="vendor")
]


class Settings(BaseSettings):
    """The whole configuration, frozen once loaded."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    syncd: DaemonSettings = DaemonSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()  # type: ignore[call-arg]
    spool: SpoolSettings = SpoolSettings()
    mqtt: MqttSettings | None = None
    sources: list[SourceSettings] = []

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, *args: Any, **kw: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file and SYNCD_ overrides are merged by load() so every error carries the same field path.
        return (init_settings,)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for s in self.sources:
            if s.name in seen:
                raise ValueError(f"source name {s.name!r} is used twice; names must be unique")
            seen.add(s.name)
        return self

    @property
    def clickhouse_dsn(self) -> str:
        return self.clickhouse.dsn or f"chdb://{(self.syncd.data_dir / 'clickhouse').resolve()}"

    def secrets(self) -> list[str]:
        """Every secret value, so logging can prove none is printed."""
        out = []
        for obj in [self.mqtt, *self.sources]:
            if obj is None:
                continue
            for name in type(obj).model_fields:
                v = getattr(obj, name)
                if isinstance(v, SecretStr) and v.get_secret_value():
                    out.append(v.get_secret_value())
        urls = [self.clickhouse.dsn, self.mqtt.url if self.mqtt else ""]
        urls += [s.mqtt_url for s in self.sources if isinstance(s, NavixySource)]
        for url in urls:  # a password written into a URL (https://user:pass@host) is a secret too
            password = urlsplit(url).password if url else None
            if password:
                out += [password, unquote(password)]
        return out


def start_ms(start: str, now_ms: int) -> int:
    """A source's `start`: a duration back from now ('24h') or an ISO date/time (UTC if no zone)."""
    try:
        return now_ms - int(parse_duration(start) * 1000)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(start.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"must be a duration back ('24h') or an ISO date ('2024-01-01') (got {start!r})") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


# -- loading -------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> Settings:
    """Read, merge, expand and validate; raises ConfigError listing every problem with its field path."""
    env = dict(os.environ if env is None else env)
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"{path}: file not found"]) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError([f"{path}: not valid TOML: {err}"]) from None
    _apply_env_overrides(raw, env, problems)
    raw = _expand(raw, env, problems, "")
    try:
        settings = Settings(**raw)
    except ValidationError as err:
        problems.extend(_describe(err, raw))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


def _apply_env_overrides(raw: dict[str, Any], env: dict[str, str], problems: list[str]) -> None:
    """SYNCD_SECTION__KEY=value; sources by index or name: SYNCD_SOURCES__0__RATE, SYNCD_SOURCES__LYNX_PROD__RATE."""
    for name, value in sorted(env.items()):
        if not name.startswith("SYNCD_") or "__" not in name:
            continue
        parts = [p.lower() for p in name[len("SYNCD_"):].split("__")]
        parsed = _env_value(value)
        if parts[0] == "sources" and len(parts) == 3:
            sources = raw.get("sources", [])
            target = None
            if parts[1].isdigit() and int(parts[1]) < len(sources):
                target = sources[int(parts[1])]
            else:
                target = next((s for s in sources if str(s.get("name", "")).lower().replace("-", "_") == parts[1]), None)
            if target is None:
                problems.append(f"{name}: no source {parts[1]!r} to override")
                continue
            target[parts[2]] = parsed
        elif len(parts) == 2:
            raw.setdefault(parts[0], {})
            if isinstance(raw[parts[0]], dict):
                raw[parts[0]][parts[1]] = parsed


def _env_value(value: str) -> Any:
    """Environment values are TOML literals when they parse as one ('10', 'true', '["a"]'), else strings."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _expand(node: Any, env: dict[str, str], problems: list[str], where: str) -> Any:
    """`${NAME}` from the environment; `x_file = path` becomes `x` = the file's content (trailing newline cut)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            path = f"{where}.{key}" if where else key
            is_secret_file = key.endswith("_file") and key not in ("ca_file", "cert_file", "key_file")
            if is_secret_file and isinstance(value, str):
                try:
                    out[key[: -len("_file")]] = Path(value).read_text(encoding="utf-8").rstrip("\n")
                except OSError as err:
                    problems.append(f"{path}: cannot read secret file {value!r}: {err.strerror}")
                continue
            out[key] = _expand(value, env, problems, path)
        return out
    if isinstance(node, list):
        return [_expand(v, env, problems, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                problems.append(f"{where}: environment variable {m.group(1)} is not set")
                return ""
            return env[m.group(1)]

        return _ENV_REF.sub(sub, node)
    return node


_MESSAGES = [
    (re.compile(r"^Input should be (.*)$"), r"must be \1"),
    (re.compile(r"^Extra inputs are not permitted$"), "unknown key"),
    (re.compile(r"^Field required$"), "is required"),
    (re.compile(r"^Value error, (.*)$"), r"\1"),
    (re.compile(r"^String should match pattern '(.*)'$"), r"must match \1"),
    (re.compile(r"^String should have at least 1 character$"), "must not be empty"),
]


def _describe(err: ValidationError, raw: dict[str, Any]) -> list[str]:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        # A tagged union adds the tag to the path (sources.1.iotopen.rate): leave it out.
        if len(loc) >= 3 and loc[0] == "sources" and isinstance(loc[1], int) and loc[2] in (
            "iotopen", "proxus", "ioto", "ixon", "navixy"
        ):
            del loc[2]
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"]
        if e["type"] == "union_tag_invalid":
            msg = "must be one of iotopen, proxus, ioto, ixon, navixy"
            path += ".vendor"
        elif e["type"] == "union_tag_not_found":
            msg = "is required (iotopen, proxus, ioto, ixon, navixy)"
            path += ".vendor"
        for pattern, repl in _MESSAGES:
            msg = pattern.sub(repl, msg)
        lines.append(f"{path or '<root>'}: {msg}")
    return lines
