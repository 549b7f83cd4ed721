// Call one MCP tool over Streamable HTTP with the TypeScript MCP SDK (@modelcontextprotocol/sdk), configured
// by the environment only:
//
//     node mcp_call.mjs URL TOOL [ARGS_JSON] [META_JSON]
//
// Initialises a session, lists the tools, calls TOOL with ARGS_JSON (default {}) and, when given, META_JSON as
// the request's params._meta, closes the session (DELETE with its Mcp-Session-Id) and prints one JSON object:
//   {"tools": [...], "result": <CallToolResult as received>, "progress": [...]}
//
// Node 20's fetch ignores proxy variables, so the SDK transport gets a fetch that goes through undici's
// EnvHttpProxyAgent (HTTP_PROXY / HTTPS_PROXY / NO_PROXY); NODE_EXTRA_CA_CERTS adds the proxy's CA for
// intercepted HTTPS. Both come from `x402-proxy env`.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { EnvHttpProxyAgent, fetch as undiciFetch } from "undici";

const [url, tool, args = "{}", meta] = process.argv.slice(2);
const dispatcher = new EnvHttpProxyAgent();
const transport = new StreamableHTTPClientTransport(new URL(url), {
  fetch: (input, init) => undiciFetch(input, { ...init, dispatcher }),
});
const client = new Client({ name: "x402-proxy-tests-ts", version: "1.0.0" });
const progress = [];

await client.connect(transport);
const tools = (await client.listTools()).tools.map((t) => t.name).sort();
const params = { name: tool, arguments: JSON.parse(args) };
if (meta) params._meta = JSON.parse(meta);
const result = await client.callTool(params, undefined, {
  onprogress: (p) => progress.push(p),
  timeout: 120_000,
});
await transport.terminateSession();
await client.close();
process.stdout.write(JSON.stringify({ tools, result, progress }));
