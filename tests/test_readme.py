"""The README's promises: its quickstart works as printed, and every command it lists is run by a test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_quickstart_demo_serve_then_env_and_curl() -> None:
    """`make demo DEMO_ARGS=--serve`, then the two printed lines in a fresh shell: curl pays through the proxy."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    demo = subprocess.Popen(
        [sys.executable, "scripts/demo.py", "--serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert demo.stdout is not None
        printed: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(line.strip().startswith("curl -i") for line in printed):
            line = demo.stdout.readline()
            if not line:
                break
            printed.append(line)
        output = "".join(printed)
        eval_line = next(line.strip() for line in printed if line.strip().startswith('eval "$('))
        curl_line = next(line.strip() for line in printed if line.strip().startswith("curl -i"))
        assert "Done: one request, one payment" in output, output
        shell = subprocess.run(
            ["bash", "-c", f"{eval_line}\n{curl_line.replace('curl -i', 'curl -sS -i --max-time 60')}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        head = shell.stdout.replace("\r\n", "\n").split("\n\n", 1)[0].lower()
        assert head.startswith("http/1.1 200"), shell.stdout[:1000] + shell.stderr
        assert "x-402-proxy-payment:" in head and "x-402-proxy-session:" in head
        assert "via: 1.1 x402-proxy" in head or "x-402-proxy-payment" in head
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        code = demo.wait(60)
    assert code == 0


GROUPS = ("ca", "config", "wallet", "sessions", "store")


def readme_commands() -> set[tuple[str, ...]]:
    """`x402-proxy <command> [<subcommand>]` as written in the README (code blocks and the commands table)."""
    found: set[tuple[str, ...]] = set()
    for match in re.finditer(r"x402-proxy ([^`\n)]+)", README):
        tokens = match.group(1).split()
        while tokens and tokens[0].startswith("--"):  # global options and their values
            tokens = tokens[2:]
        if not tokens or not re.fullmatch(r"[a-z]+", tokens[0]):
            continue
        command, rest = tokens[0], " ".join(tokens[1:])
        if command not in GROUPS:
            found.add((command,))
            continue
        for alternative in rest.split("\\|"):
            words = alternative.split()
            if words and re.fullmatch(r"[a-z]+", words[0]):
                found.add((command, words[0]))
    return found


def test_every_readme_command_is_run_by_a_test_or_the_demo() -> None:
    commands = readme_commands()
    expected = {("run",), ("env",), ("health",), ("payments",), ("budget",), ("config", "check")}
    expected |= {
        ("ca", "path"),
        ("ca", "export"),
        ("wallet", "new"),
        ("sessions", "list"),
        ("sessions", "end"),
    }
    assert expected <= commands, sorted(commands)
    # The Dockerfile counts: tests/test_sidecar.py runs its HEALTHCHECK command as written.
    runners = [*REPO.glob("tests/**/*.py"), REPO / "scripts" / "demo.py", REPO / "Dockerfile"]
    sources = [p.read_text() for p in runners]
    sources = [s for s in sources if "readme_commands" not in s]
    missing = []
    for command in sorted(commands):
        pattern = r",\s*".join(f"[\"']{word}[\"']" for word in command)
        if not any(re.search(pattern, text) for text in sources):
            missing.append(" ".join(command))
    assert not missing, f"README commands no test runs: {missing}"
