"""Config layering and the example file."""

from __future__ import annotations

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
