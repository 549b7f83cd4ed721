"""`[mcp]`: paying x402 inside MCP tool calls (docs/mcp.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from proxy.payments.amounts import parse_decimal
from proxy.sessions.scope import ScopeError, normalize_url


class McpValueError(ValueError):
    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field_name


@dataclass
class McpToolRule:
    """A cap for one tool (or every tool, name "*") of one MCP server, on top of the policy."""

    server: str  # the Streamable HTTP endpoint, e.g. "https://tools.example/mcp"
    name: str = "*"
    max_per_call: str | None = None  # in the asset's units, e.g. "0.01"; None: the policy alone
    allowed: bool = True  # false: never pay this tool (its payment-required result goes to the client)

    def validate(self) -> None:
        try:
            normalize_url(self.server)
        except ScopeError as exc:
            raise McpValueError("server", f"not an http(s) URL: {exc}") from None
        if not self.name:
            raise McpValueError("name", 'a tool name, or "*" for every tool of the server')
        if self.max_per_call is not None:
            parse_decimal(self.max_per_call, what="max_per_call")


@dataclass
class McpSettings:
    # Inspect Streamable HTTP `tools/call` answers and pay payment-required results (x402 over MCP).
    pay_tools: bool = True
    # A cap for every paid tool call, on top of the policy (None: the policy alone).
    max_per_call: str | None = None
    # Per-tool caps and refusals; the first rule matching server and name applies.
    tools: list[McpToolRule] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_per_call is not None:
            parse_decimal(self.max_per_call, what="max_per_call")

    def rule_for(self, endpoint: str, tool: str) -> McpToolRule | None:
        for rule in self.tools:
            if rule.name in ("*", tool) and _same_endpoint(rule.server, endpoint):
                return rule
        return None

    def cap_for(self, endpoint: str, tool: str) -> Decimal | None:
        """The lowest cap that applies to one call of `tool` at `endpoint` (None: the policy alone)."""
        rule = self.rule_for(endpoint, tool)
        caps = [c for c in (self.max_per_call, rule.max_per_call if rule else None) if c is not None]
        return min(parse_decimal(c, what="max_per_call") for c in caps) if caps else None


def _same_endpoint(configured: str, endpoint: str) -> bool:
    try:
        return str(normalize_url(configured)).rstrip("/") == str(normalize_url(endpoint)).rstrip("/")
    except ScopeError:
        return False
