"""Configuration: field paths in every error, env overrides, secrets from env and files."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd.errors import ConfigError
from syncd.settings import load, parse_duration, parse_size
from tests.helpers import syncd

GOOD = """
[syncd]
data_dir = "{tmp}/data"
[clickhouse]
batch_age = "2s"
[[sources]]
name = "lynx"
vendor = "iotopen"
api_key = "${{LYNX_KEY}}"
interval = "60s"
"""


def test_three_mistakes_are_all_named_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[[sources]]\nname = "a"\nvendor = "iotopen"\napi_key = "k"\n'
        '[[sources]]\nname = "b"\nvendor = "iotopen"\napi_key = "k"\nrate = 0\nintervall = "5s"\n'
        '[clickhouse]\nbatch_age = "soon"\n'
    )
    r = syncd("check", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "sources[1].rate: must be greater than 0" in r.stdout
    assert "sources[1].intervall: unknown key" in r.stdout
    assert "clickhouse.batch_age: must be a duration" in r.stdout
    assert "3 problem(s)" in r.stdout


def test_a_zero_interval_or_timeout_is_named_not_a_crash_at_scheduling(tmp_path: Path) -> None:
    cfg = tmp_path / "zero.toml"
    cfg.write_text('[[sources]]\nname = "a"\nvendor = "iotopen"\napi_key = "k"\ninterval = "0s"\ntimeout = "0ms"\n')
    r = syncd("check", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "sources[0].interval: must be longer than zero (got 0 s)" in r.stdout
    assert "sources[0].timeout: must be longer than zero (got 0 s)" in r.stdout
    assert "2 problem(s)" in r.stdout


def test_valid_config_exits_0(tmp_path: Path) -> None:
    cfg = tmp_path / "good.toml"
    cfg.write_text(GOOD.format(tmp=tmp_path))
    r = syncd("check", "--config", str(cfg), env={"LYNX_KEY": "k-123"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


def test_env_reference_file_secret_and_overrides(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD.format(tmp=tmp_path).replace('api_key = "${LYNX_KEY}"', f'api_key_file = "{secret}"'))
    s = load(cfg, {"SYNCD_SOURCES__LYNX__RATE": "2.5", "SYNCD_CLICKHOUSE__BATCH_ROWS": "10",
                   "SYNCD_SYNCD__INSTANCE": "syncd-7"})
    src = s.sources[0]
    assert src.api_key is not None and src.api_key.get_secret_value() == "from-file"
    assert src.rate == 2.5 and s.clickhouse.batch_rows == 10 and s.syncd.instance == "syncd-7"
    assert "from-file" not in repr(s)  # SecretStr never prints


def test_missing_env_var_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD.format(tmp=tmp_path))
    with pytest.raises(ConfigError) as err:
        load(cfg, {})
    assert err.value.problems == ["sources[0].api_key: environment variable LYNX_KEY is not set"]


def test_unknown_vendor_and_duplicate_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[sources]]\nname = "x"\nvendor = "acme"\n[[sources]]\nname = "y"\nvendor = "ioto"\n'
                   'base_url = "http://h"\ntoken = "t"\n[[sources]]\nname = "y"\nvendor = "ioto"\n'
                   'base_url = "http://h"\ntoken = "t"\n')
    with pytest.raises(ConfigError) as err:
        load(cfg, {})
    assert any(p.startswith("sources[0].vendor: must be one of") for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        load(_drop_first(cfg), {})
    assert any("used twice" in p for p in err.value.problems)


def _drop_first(cfg: Path) -> Path:
    text = cfg.read_text().split("[[sources]]")
    out = cfg.with_name("c2.toml")
    out.write_text("[[sources]]" + "[[sources]]".join(text[2:]))
    return out


def test_durations_and_sizes() -> None:
    assert parse_duration("500ms") == 0.5 and parse_duration("15m") == 900 and parse_duration("24h") == 86400
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("10MB") == 10**7
    with pytest.raises(ValueError):
        parse_duration("60")


def test_example_config_validates_with_every_vendor() -> None:
    env = {name: "x" for name in ("IOTOPEN_API_KEY", "MQTT_PASSWORD", "PROXUS_PASSWORD", "IOTO_TOKEN",
                                  "IXON_APPLICATION_ID", "IXON_COMPANY_ID", "IXON_TOKEN", "NAVIXY_API_KEY",
                                  "NAVIXY_MQTT_PASSWORD")}
    settings = load(Path(__file__).parent.parent / "config" / "example.toml", env)
    assert sorted(s.vendor for s in settings.sources) == ["ioto", "iotopen", "ixon", "navixy", "proxus"]
    assert settings.mqtt is not None and settings.mqtt.password.get_secret_value() == "x"


def test_a_stream_kind_the_vendor_does_not_have_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[sources]]\nname = "p"\nvendor = "proxus"\nbase_url = "https://p.example.com"\n'
                   'username = "u"\npassword = "p"\nstreams = ["telemetry", "status"]\n')
    with pytest.raises(ConfigError) as err:
        load(cfg, {})
    assert err.value.problems == ["sources[0].streams[1]: must be 'telemetry' or 'alert'"]


def test_passwords_inside_urls_count_as_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[clickhouse]\ndsn = "https://u:ch%2Fpass@ch.example.com:8443"\n'
                   '[mqtt]\nurl = "mqtts://bus:mqtt-url-pass@broker.example.com"\n')
    secrets = load(cfg, {}).secrets()
    assert {"ch%2Fpass", "ch/pass", "mqtt-url-pass"} <= set(secrets)
