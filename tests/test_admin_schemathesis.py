"""Schemathesis against /openapi.json of a real proxy: no 5xx, every response matches the document.

POST /sessions is only fed schema-violating bodies (negative mode): a valid one would make the proxy
fetch whatever URL was generated, i.e. leave loopback. Everything else runs positive and negative.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import proxy_config
from tests.support.admin import AdminProxy
from tests.support.certs import UpstreamCA

CONFIG = """
[[operations]]
include-operation-id = "startSession"
generation.mode = "negative"

# An origin that is no URL is refused (400) although the schema cannot say so.
[[operations]]
include-operation-id = "listSessions"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]
"""


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory, upstream_ca: UpstreamCA) -> Iterator[AdminProxy]:
    home = tmp_path_factory.mktemp("admin-st") / "home"
    process = AdminProxy(home, proxy_config(upstream_ca)).start()
    yield process
    process.stop()


def test_schemathesis(admin: AdminProxy, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    st = Path(sys.executable).parent / "st"
    command = [
        str(st), "--config-file", str(config), "--no-color", "run", f"{admin.admin_url}/openapi.json",
        "-H", f"Authorization: Bearer {admin.token}",
        "--exclude-path", "/mcp",  # JSON-RPC: covered with the MCP SDK client in test_admin_mcp.py
        "--max-examples", "25", "--seed", "402", "--workers", "1", "--request-timeout", "20",
        "--output-truncate", "true",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=admin.env, capture_output=True, text=True, timeout=120,
                            check=False)
    tail = "\n".join(line[:300] for line in result.stdout.splitlines()[-60:])
    assert result.returncode == 0, f"{tail}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1], tail
    assert "Traceback" not in admin.log_text()
