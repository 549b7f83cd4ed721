"""The sidecar image without a Docker engine: the Dockerfile's ENV lines, its ENTRYPOINT script and its
HEALTHCHECK command, with the environments of examples/sidecar/compose.yaml, run here as processes.

Only what a container would change is mapped: the service name `x402-proxy` becomes 127.0.0.1, the
container paths become temporary directories, ports 8402/8403 become free ports. Configuration is the
environment alone (no --config file), exactly as the image gets it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.stack import Stack
from tests.support.admin import ADMIN_RE, AdminProxy
from tests.support.certs import UpstreamCA
from tests.support.paying_proxy import stack_config
from tests.support.proxy_process import REPO
from tests.support.upstream import Upstream

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "examples" / "sidecar" / "compose.yaml"
AGENT = REPO / "examples" / "sidecar" / "agent.py"
SERVICE = "x402-proxy"
PROXY_PORT, ADMIN_PORT = "8402", "8403"
STARTUP_TIMEOUT = 60.0  # two Python start-ups (CA export, then the proxy) on a loaded 2-core machine


# -- what the image and the compose file say ----------------------------------------------------------------


def final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stage: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stage = []
        stage.append((instruction.upper(), args.strip()))
    return stage


def instruction(name: str) -> str:
    found = [args for instr, args in final_stage() if instr == name]
    assert len(found) == 1, f"expected one {name} in the final stage, found {found}"
    return found[0]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in final_stage():
        if instr == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def entrypoint_script() -> Path:
    """The repository file the image runs as its ENTRYPOINT (found through the COPY that installs it)."""
    (target,) = json.loads(instruction("ENTRYPOINT"))
    for instr, args in final_stage():
        parts = args.split()
        if instr == "COPY" and parts[-1] == target and not parts[0].startswith("--from"):
            return REPO / parts[0]
    raise AssertionError(f"no COPY installs the entrypoint {target}")


def healthcheck_command() -> list[str]:
    args = instruction("HEALTHCHECK")
    command: list[str] = json.loads(args.split(" CMD ", 1)[1])
    return command


def compose_environment(service: str) -> dict[str, str]:
    spec = yaml.safe_load(COMPOSE.read_text())
    return {str(k): str(v) for k, v in spec["services"][service]["environment"].items()}


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default}, ${NAME:?error}, from the .env file's variables."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if variables.get(name):
            return variables[name]
        if op == ":?":
            raise AssertionError(f"compose would refuse to start: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


# -- the container's world, mapped onto this machine -----------------------------------------------------------


def free_wildcard_port() -> int:
    """A port free on every local address: the sidecar binds 0.0.0.0, which fails when any address
    (127.0.0.2, say, of a test server) holds the port, though 127.0.0.1 alone would be free."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Sandbox:
    """Where one "container" lives here: its volumes as directories, its ports as free loopback ports."""

    root: Path
    proxy_port: int
    admin_port: int

    @classmethod
    def create(cls, root: Path) -> Sandbox:
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, free_wildcard_port(), free_wildcard_port())

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def ca_dir(self) -> Path:
        return self.root / "x402-ca"

    def translate(self, value: str, image: Mapping[str, str]) -> str:
        venv_bin = str(Path(sys.executable).parent)  # /opt/venv/bin in the image: where x402-proxy is
        value = value.replace("/opt/venv/bin", venv_bin).replace("$PATH", os.environ["PATH"])
        value = value.replace(image["X402_PROXY_HOME"], str(self.home))
        value = value.replace(image["X402_PROXY_CA_EXPORT_DIR"], str(self.ca_dir))
        value = re.sub(rf":{PROXY_PORT}\b", f":{self.proxy_port}", value)
        value = re.sub(rf":{ADMIN_PORT}\b", f":{self.admin_port}", value)
        # The service name as a host (in URLs and NO_PROXY); the image's paths were mapped above.
        return re.sub(rf"(?<![\w.-]){re.escape(SERVICE)}(?=[:,]|$)", "127.0.0.1", value)

    def container_env(self, variables: Mapping[str, str], *, with_compose: bool = True) -> dict[str, str]:
        """What `docker run` gives the proxy container (and `docker exec` and the HEALTHCHECK): the host's
        basics, the image's ENV lines, then the compose service's environment."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith("X402_PROXY_")
        }
        image = image_env()
        env.update({k: self.translate(v, image) for k, v in image.items()})
        if with_compose:
            for name, raw in compose_environment(SERVICE).items():
                env[name] = interpolate(self.translate(raw, image), variables)
        return env

    def agent_env(self, variables: Mapping[str, str]) -> dict[str, str]:
        image = image_env()
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        for name, raw in compose_environment("agent").items():
            env[name] = interpolate(self.translate(raw, image), variables)
        return env


def secrets_for_env_file(**extra: str) -> dict[str, str]:
    """The values a user puts in examples/sidecar/.env."""
    return {"PROXY_PASSWORD": secrets.token_hex(12), "ADMIN_TOKEN": secrets.token_hex(24), **extra}


def upstream_trust(upstream_ca: UpstreamCA) -> dict[str, str]:
    """Test-only settings: our loopback origin is signed by a test CA and listens on odd ports. A real
    sidecar reaches public HTTPS origins on 443 and needs neither."""
    return {
        "X402_PROXY_UPSTREAM__EXTRA_CA_BUNDLE": str(upstream_ca.cert_path),
        "X402_PROXY_PROXY__CONNECT_PORTS": '["*"]',
    }


class Sidecar(AdminProxy):
    """The image's ENTRYPOINT run as a process, with the container's environment and no config file.

    It binds 0.0.0.0; the test talks to it through 127.0.0.1 only."""

    bound_address = ""
    bound_admin = ""

    def start(
        self, listen: str = "", timeout: float = STARTUP_TIMEOUT, extra: tuple[str, ...] = ()
    ) -> Sidecar:
        listening = self.launch([str(entrypoint_script()), *extra], cwd=self.home.parent, timeout=timeout)
        for line in self.startup_lines:  # the admin address is printed before the "listening on" line
            if match := ADMIN_RE.search(line):
                self.bound_admin = match.group(1).removeprefix("http://")
        self.bound_address = listening.group(1)
        self.address = loopback(self.bound_address)
        self.admin_url = f"http://{loopback(self.bound_admin)}"
        self.token = self._token()
        return self

    def proxy_url(self, agent_env: Mapping[str, str]) -> dict[str, str]:
        return {"http": agent_env["HTTP_PROXY"], "https": agent_env["HTTPS_PROXY"]}


def loopback(bound: str) -> str:
    """A wildcard bind is reached through 127.0.0.1 (the house rule: loopback only)."""
    host, _, port = bound.rpartition(":")
    assert host == "0.0.0.0", f"expected a wildcard bind, got {bound}"
    return f"127.0.0.1:{port}"


def start_sidecar(sandbox: Sandbox, variables: Mapping[str, str], extra_env: Mapping[str, str]) -> Sidecar:
    env = sandbox.container_env(variables)
    env.update(extra_env)
    # AdminProxy writes an (empty) config file next to the home; the entrypoint is never given it.
    process = Sidecar(sandbox.home, "", env)
    process.env = env  # exactly the container's environment, nothing else from this shell
    return process.start()


def run_agent(sandbox: Sandbox, variables: Mapping[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(AGENT)],
        env=sandbox.agent_env(variables),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


# -- a running sidecar -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    return Sandbox.create(tmp_path_factory.mktemp("sidecar"))


@pytest.fixture(scope="module")
def variables() -> dict[str, str]:
    return secrets_for_env_file()


@pytest.fixture(scope="module")
def sidecar(
    sandbox: Sandbox, variables: dict[str, str], upstream_ca: UpstreamCA, upstream: Upstream
) -> Iterator[Sidecar]:
    process = start_sidecar(sandbox, variables, upstream_trust(upstream_ca))
    yield process
    process.stop()


def test_image_runs_the_entrypoint_script_as_a_non_root_user() -> None:
    assert entrypoint_script() == REPO / "docker" / "entrypoint.sh"
    assert os.access(entrypoint_script(), os.X_OK), "COPY keeps the mode: the script must be executable"
    assert instruction("USER").split(":")[0] not in ("0", "root")
    volumes = json.loads(instruction("VOLUME"))
    env = image_env()
    assert set(volumes) == {env["X402_PROXY_HOME"], env["X402_PROXY_CA_EXPORT_DIR"]}


def test_binds_every_interface_from_environment_alone(sidecar: Sidecar, sandbox: Sandbox) -> None:
    assert sidecar.bound_address == f"0.0.0.0:{sandbox.proxy_port}"
    assert sidecar.bound_admin == f"0.0.0.0:{sandbox.admin_port}"
    assert sidecar.proc is not None
    # exec: the process the container runtime signals is the proxy itself, not a shell in front of it.
    cmdline = Path(f"/proc/{sidecar.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"run" in cmdline and not any(b"entrypoint" in part for part in cmdline), cmdline
    assert b"--config" not in cmdline


def test_proxy_needs_the_agents_credentials(
    sidecar: Sidecar, sandbox: Sandbox, variables: dict[str, str], upstream: Upstream
) -> None:
    bare = requests.get(f"{upstream.http_url}/echo/anon", proxies={"http": sidecar.url}, timeout=30)
    assert bare.status_code == 407 and "Proxy-Authenticate" in bare.headers
    agent_proxies = sidecar.proxy_url(sandbox.agent_env(variables))
    answer = requests.get(f"{upstream.http_url}/echo/agent-http", proxies=agent_proxies, timeout=30)
    assert answer.status_code == 200 and answer.json()["path"] == "/echo/agent-http"


def test_ca_is_exported_to_the_shared_volume(sidecar: Sidecar, sandbox: Sandbox) -> None:
    ca = (sandbox.home / "ca.pem").read_bytes()
    exported = sandbox.ca_dir / "ca.pem"
    bundle = sandbox.ca_dir / "ca-bundle.pem"
    assert exported.read_bytes() == ca
    assert sidecar.call("GET", "/ca.pem").content == ca
    bundle_text = bundle.read_bytes()
    assert bundle_text.endswith(ca) and bundle_text.count(b"BEGIN CERTIFICATE") > 10  # public roots too
    for path in (exported, bundle):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, "the agent container runs as another user"
    assert not (sandbox.ca_dir / "ca-key.pem").exists()
    assert sorted(p.name for p in sandbox.ca_dir.iterdir()) == ["ca-bundle.pem", "ca.pem"]


def test_agent_container_uses_the_proxy_and_trusts_the_exported_ca(
    sidecar: Sidecar, sandbox: Sandbox, variables: dict[str, str], upstream: Upstream
) -> None:
    # HTTPS is intercepted: the agent's TLS succeeds only because it trusts the bundle from the shared
    # volume (its public roots do not include the test origin's CA, so a direct connection would fail).
    url = f"{upstream.https_url}/echo/agent-https"
    answer = run_agent(sandbox, {**variables, "AGENT_URL": url})
    assert answer["status"] == 200 and answer["proxy_error"] is None, answer
    received = dict(upstream.last("/echo/agent-https").headers)
    assert "x402-proxy" in received.get("Via", ""), received
    # ... and it reached the admin API on the sidecar's wildcard bind with the shared token.
    assert answer["budget"]["global"]["spent"] == "0"


def test_admin_api_on_wildcard_bind_needs_the_token(sidecar: Sidecar) -> None:
    anonymous = requests.get(f"{sidecar.admin_url}/budget", timeout=10, proxies={"http": ""})
    assert anonymous.status_code == 401
    assert sidecar.call("GET", "/budget").status_code == 200
    # MCP from another container arrives with the service name in Host: a wildcard bind accepts it.
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "agent", "version": "1"},
        },
    }
    headers = {
        "Host": f"{SERVICE}:{ADMIN_PORT}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    response = sidecar.call("POST", "/mcp", json=initialize, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert "serverInfo" in response.text


def test_healthcheck_command(sidecar: Sidecar, sandbox: Sandbox, variables: dict[str, str]) -> None:
    # Docker runs it with the container's environment: the image ENV and compose's, not the entrypoint's.
    env = sandbox.container_env(variables)
    started = time.monotonic()
    healthy = subprocess.run(healthcheck_command(), env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert healthy.returncode == 0, healthy.stderr
    assert f"127.0.0.1:{sandbox.admin_port}/healthz" in healthy.stdout
    timeout = re.search(r"--timeout=(\d+)s", instruction("HEALTHCHECK"))
    assert timeout is not None and elapsed < int(timeout.group(1)), f"health check took {elapsed:.1f}s"
    ready = subprocess.run(
        [*healthcheck_command(), "--ready"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ready.returncode == 0 and ready.stdout.strip().endswith("/readyz"), ready.stderr
    wrong = {**env, "X402_PROXY_ADMIN_TOKEN": "not-the-right-token-0123"}
    unhealthy = subprocess.run(healthcheck_command(), env=wrong, capture_output=True, text=True, timeout=60)
    assert unhealthy.returncode == 1 and "401" in unhealthy.stderr


# -- refusals and shutdown ---------------------------------------------------------------------------------


def test_refuses_wildcard_bind_without_proxy_auth(tmp_path: Path) -> None:
    sandbox = Sandbox.create(tmp_path)
    env = sandbox.container_env({}, with_compose=False)  # the bare image: no credentials given
    result = subprocess.run(
        [str(entrypoint_script())], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to listen on non-loopback 0.0.0.0 without proxy auth" in result.stderr
    assert "X402_PROXY_PROXY__LISTEN" in result.stderr
    assert not (sandbox.ca_dir / "ca.pem").exists()
    assert connection_refused(sandbox.proxy_port)


def test_sigterm_drains_then_exits_zero(tmp_path: Path, upstream_ca: UpstreamCA, upstream: Upstream) -> None:
    sandbox = Sandbox.create(tmp_path)
    variables = secrets_for_env_file()
    process = start_sidecar(sandbox, variables, upstream_trust(upstream_ca))
    try:
        proxies = process.proxy_url(sandbox.agent_env(variables))
        outcome: dict[str, Any] = {}

        def slow_request() -> None:
            response = requests.get(
                f"{upstream.https_url}/slow?seconds=3",
                proxies=proxies,
                timeout=60,
                verify=str(sandbox.ca_dir / "ca.pem"),
            )
            outcome["status"], outcome["body"] = response.status_code, response.text

        def slow_seen() -> int:  # the upstream is shared by the whole test session: count, don't look
            return sum(1 for r in upstream.received if r.path.startswith("/slow"))

        earlier = slow_seen()
        slow = threading.Thread(target=slow_request)
        slow.start()
        deadline = time.monotonic() + 20
        while slow_seen() == earlier and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.proc is not None
        process.proc.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1

        not_ready = None
        while not_ready is None and time.monotonic() < deadline:
            ready = process.call("GET", "/readyz", timeout=5)
            if ready.status_code == 503:
                not_ready = ready
            else:
                time.sleep(0.05)
        assert not_ready is not None and not_ready.json()["code"] == "not_ready"
        assert slow.is_alive(), "the slow request should still be in flight while draining"
        assert connection_refused(sandbox.proxy_port), "new connections must be refused while draining"

        slow.join(30)
        assert outcome == {"status": 200, "body": "slow\n"}
        assert process.proc.wait(30) == 0
    finally:
        process.stop()

    # The home is a volume: a restarted container keeps its CA, and re-exports the same one.
    ca_before = (sandbox.ca_dir / "ca.pem").read_bytes()
    again = start_sidecar(sandbox, variables, upstream_trust(upstream_ca))
    try:
        assert (sandbox.ca_dir / "ca.pem").read_bytes() == ca_before == (sandbox.home / "ca.pem").read_bytes()
    finally:
        again.stop()


# -- paying ---------------------------------------------------------------------------------------------------


def test_agent_pays_through_the_sidecar(x402_stack: Stack, tmp_path: Path) -> None:
    """The local chain's token is not a built-in asset: its [[assets]] entry (a TOML array of tables, which
    environment variables cannot express) comes from a config file mounted into the container and named
    by X402_PROXY_CONFIG, which every command in the container reads, the health check included."""
    sandbox = Sandbox.create(tmp_path)
    config = sandbox.root / "config.toml"
    config.write_text(stack_config(x402_stack))
    variables = secrets_for_env_file(X402_PROXY_PRIVATE_KEY=x402_stack.payer_key)
    mounted = {"X402_PROXY_CONFIG": str(config)}
    # 127.0.0.2: the agent's NO_PROXY names 127.0.0.1, which would bypass the proxy.
    with x402_stack.start_py_server(host="127.0.0.2") as server:
        process = start_sidecar(sandbox, variables, mounted)
        try:
            payee_before = x402_stack.balance_of(x402_stack.pay_to)
            payer_before = x402_stack.balance_of(x402_stack.payer_address)
            answer = run_agent(sandbox, {**variables, "AGENT_URL": f"{server.url}/paid/a"})
            assert answer["status"] == 200 and answer["payment"], answer
            assert x402_stack.balance_of(x402_stack.pay_to) - payee_before == x402_stack.price
            assert payer_before - x402_stack.balance_of(x402_stack.payer_address) == x402_stack.price
            spent = Decimal(answer["budget"]["global"]["spent"])
            assert spent == Decimal(x402_stack.price) / 10**x402_stack.token_decimals
            env = {**sandbox.container_env(variables), **mounted}
            healthy = subprocess.run(
                healthcheck_command(), env=env, capture_output=True, text=True, timeout=60
            )
            assert healthy.returncode == 0, healthy.stderr
        finally:
            process.stop()
