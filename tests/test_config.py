"""Config layering and the example file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, load_config, redacted

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def test_example_loads_and_equals_defaults() -> None:
    loaded = load_config(EXAMPLE, env={})
    defaults = Config()
    loaded.sources, defaults.sources = {}, {}
    assert redacted(loaded) == redacted(defaults)


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    plain = redacted(Config())

    def walk(node: dict, prefix: str) -> None:  # type: ignore[type-arg]
        for key, value in node.items():
            if isinstance(value, dict) and value:
                assert f"[{prefix}{key}]" in text, f"section [{prefix}{key}] undocumented"
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, dict | list) and not value and (not prefix or key == "rules"):
                table = f"{prefix}{key}"
                assert f"[{table}]" in text or f"[[{table}]]" in text, f"section {table} undocumented"
            else:
                assert f"{key} =" in text or f"# {key}" in text, f"{prefix}{key} undocumented"

    walk(plain, "")


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text('[proxy]\nlisten = "127.0.0.1:1111"\n[policy]\nmax_per_payment = "0.05"\n')
    env = {"X402_PROXY_PROXY__LISTEN": "127.0.0.1:2222", "X402_PROXY_POLICY__DAILY_BUDGET": "2.5"}
    config = load_config(config_file, env=env, cli={"proxy": {"listen": "127.0.0.1:3333"}})
    assert config.proxy.listen == "127.0.0.1:3333"
    assert config.policy.max_per_payment == "0.05"
    assert config.policy.daily_budget == "2.5"
    assert load_config(config_file, env=env).proxy.listen == "127.0.0.1:2222"


def test_env_error_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"X402_PROXY_UPSTREAM__CONNECT_TIMEOUT": "soon"})
    assert info.value.key == "upstream.connect_timeout"
    assert "X402_PROXY_UPSTREAM__CONNECT_TIMEOUT" in info.value.source


def test_unknown_key_lists_allowed(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text("[policy]\nmax_per_paymnt = \"1\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file, env={})
    assert "max_per_payment" in str(info.value) and f"{config_file}:2" in str(info.value)


def test_secrets_redacted() -> None:
    config = load_config(None, env={"X402_PROXY_PROXY__AUTH__PASSWORD": "hunter2", "X402_PROXY_PROXY__AUTH__USERNAME": "u"})
    assert "hunter2" not in str(redacted(config))


def _config_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("X402_PROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "config", "check", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_check_prints_effective_config_with_secrets_redacted(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text('[proxy]\nlisten = "127.0.0.1:1111"\n[proxy.auth]\nusername = "agent"\n')
    env = {"X402_PROXY_PROXY__AUTH__PASSWORD": "s3cret-pw", "X402_PROXY_POLICY__DAILY_BUDGET": "2.5"}
    result = _config_check("--config", str(config_file), env=env)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["proxy"]["listen"] == "127.0.0.1:1111"
    assert effective["policy"]["daily_budget"] == "2.5"
    assert effective["proxy"]["auth"] == {"username": "agent", "password": "<redacted>"}
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_config_check_names_key_source_and_allowed_values(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text('[log]\nlevel = "info"\nformat = "xml"\n')
    result = _config_check("--config", str(config_file))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "log.format" in message and f"{config_file}:3" in message, message
    assert "plain" in message and "json" in message, message
    assert "Traceback" not in result.stderr
    from_env = _config_check(env={"X402_PROXY_PROXY__DRAIN_TIMEOUT": "-1"})
    assert from_env.returncode == 2
    assert "proxy.drain_timeout" in from_env.stderr and "X402_PROXY_PROXY__DRAIN_TIMEOUT" in from_env.stderr


@pytest.mark.parametrize("ports", ['["٤٤٣"]', '["443-\uff14\uff14\uff15"]', '["0"]', '["+443"]'])
def test_connect_ports_take_ascii_port_numbers_only(tmp_path: Path, ports: str) -> None:
    """Arabic-Indic or fullwidth digits pass str.isdigit(): they must not pass as a port range."""
    config_file = tmp_path / "c.toml"
    config_file.write_text(f"[proxy]\nconnect_ports = {ports}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(config_file, env={})
    assert info.value.key == "proxy.connect_ports", info.value


def test_connect_ports_ascii_ranges_load(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text('[proxy]\nconnect_ports = ["443", "8000-9000"]\n')
    assert load_config(config_file, env={}).proxy.connect_ports == ["443", "8000-9000"]
