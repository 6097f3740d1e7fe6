"""Settings precedence, casting, failures, and that every setting is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from casimg.config import AUTO, FIELDS, Settings, describe, load_settings, usable_cores
from casimg.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults():
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.port == 9000 and settings.max_image_bytes == 50 * 1024 * 1024
    assert settings.max_pixels == 50_000_000 and settings.fetch_timeout == 60
    assert settings.allow_networks == ()


def test_precedence_defaults_toml_env_flags(tmp_path):
    toml = tmp_path / "casimg.toml"
    toml.write_text('port = 9100\nfetch_timeout = 5\nmax_pixels = 10\nallow_networks = ["10.0.0.0/8"]\n')
    settings = load_settings(toml, environ={"CASIMG_PORT": "9200", "CASIMG_MAX_PIXELS": "20"},
                             overrides={"port": 9300, "host": None})
    assert settings.port == 9300  # flag beats env beats TOML
    assert settings.max_pixels == 20  # env beats TOML
    assert settings.fetch_timeout == 5.0  # TOML beats default
    assert settings.allow_networks == ("10.0.0.0/8",)
    assert settings.host == "127.0.0.1"  # a flag of None is "not given"


def test_env_lists_and_booleans():
    settings = load_settings(environ={"CASIMG_ALLOW_NETWORKS": "127.0.0.1/32, ::1/128", "CASIMG_WORKERS": "false"})
    assert settings.allow_networks == ("127.0.0.1/32", "::1/128")
    assert settings.workers is False


@pytest.mark.parametrize(("env", "fragment"), [
    ({"CASIMG_PORT": "ninety"}, "'port'"),
    ({"CASIMG_ALLOW_NETWORKS": "not-a-network"}, "CIDR"),
    ({"CASIMG_WORKERS": "maybe"}, "true or false"),
    ({"CASIMG_MAX_PIXELS": "0"}, "at least 1"),
    ({"CASIMG_APPENDFSYNC": "never"}, "appendfsync"),
])
def test_bad_values_fail_clearly(env, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_settings(environ=env)


def test_unknown_toml_setting_and_bad_toml_fail(tmp_path):
    (tmp_path / "a.toml").write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(tmp_path / "a.toml", environ={})
    (tmp_path / "b.toml").write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(tmp_path / "b.toml", environ={})


def test_every_setting_has_help_and_a_row_in_the_settings_page_and_example_config():
    """docs/settings.md is generated from Settings (tests/test_docs.py checks it is current); this checks
    what the generator cannot make up: help for each setting, and a default the page shows truly."""
    page = (ROOT / "docs" / "settings.md").read_text()
    example = (ROOT / "config" / "casimg.example.toml").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `CASIMG_\w+` \| [^|]+ \| ([^|]+) \|", page, re.MULTILINE))
    assert set(rows) == set(FIELDS), "docs/settings.md and Settings list different settings"
    for env, _default, help_text in describe():
        assert len(help_text.strip()) > 10, f"{env} has no help text in Settings"
    for name, field in FIELDS.items():
        assert f"{name} =" in example, f"{name} is missing from config/casimg.example.toml"
        # The default as the page shows it, set through the environment, gives the default back.
        shown = rows[name].strip()
        raw = "" if shown == "*empty*" else shown.strip("`")
        env = {f"CASIMG_{name.upper()}": raw} if raw else {}
        assert getattr(load_settings(environ=env), name) == field.default, f"{name}: the page shows {shown}"
    load_settings(ROOT / "config" / "casimg.example.toml", environ={})


@pytest.mark.parametrize(("env", "fragment"), [
    ({"CASIMG_ACCEL_REDIRECT": "_blobs"}, "accel_redirect"),
    ({"CASIMG_VALIDATION": "pixels"}, "validation"),
    ({"CASIMG_PROCESSES": "0"}, "at least 1"),
])
def test_front_validation_and_process_settings_fail_clearly(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(environ=env)
    assert load_settings(environ={"CASIMG_ACCEL_REDIRECT": "/_blobs/", "CASIMG_PROCESSES": "2"}).processes == 2


def test_the_sweep_may_not_take_downloads_in_progress():
    with pytest.raises(ConfigError, match="tmp_grace"):
        load_settings(environ={"CASIMG_TMP_GRACE": "30", "CASIMG_FETCH_TIMEOUT": "60"})
    assert load_settings(environ={"CASIMG_TMP_GRACE": "30", "CASIMG_SWEEP_INTERVAL": "0"}).tmp_grace == 30


def test_a_default_callback_url_needs_a_secret_and_http():
    with pytest.raises(ConfigError, match="CASIMG_WEBHOOK_SECRET"):
        load_settings(environ={"CASIMG_WEBHOOK_URL": "https://receiver.example/hook"})
    with pytest.raises(ConfigError, match="http"):
        load_settings(environ={"CASIMG_WEBHOOK_URL": "ftp://receiver.example/", "CASIMG_WEBHOOK_SECRET": "s"})
    settings = load_settings(environ={"CASIMG_WEBHOOK_URL": "https://r.example/", "CASIMG_WEBHOOK_SECRET": "s3cr3t"})
    assert "s3cr3t" not in repr(settings)  # a logged Settings never shows the secret


def test_the_default_of_processes_is_auto_and_auto_means_the_usable_cores():
    assert load_settings(environ={}).processes == AUTO
    assert load_settings(environ={}).process_count == usable_cores() >= 1
    assert load_settings(environ={"CASIMG_PROCESSES": "Auto"}).process_count == usable_cores()
    assert load_settings(environ={}, overrides={"processes": "3"}).process_count == 3
    with pytest.raises(ConfigError):
        load_settings(environ={"CASIMG_PROCESSES": "-1"})
    with pytest.raises(ConfigError):
        load_settings(environ={"CASIMG_PROCESSES": "many"})
