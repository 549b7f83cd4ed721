// Node 20 fetch through the proxy, configured only by environment variables:
// undici's EnvHttpProxyAgent reads HTTP(S)_PROXY / NO_PROXY; NODE_EXTRA_CA_CERTS adds the proxy's CA.
import { EnvHttpProxyAgent, fetch } from "undici";

const dispatcher = new EnvHttpProxyAgent();
const [url, method = "GET", body] = process.argv.slice(2);
const response = await fetch(url, { method, body, dispatcher });
const text = await response.text();
process.stdout.write(
  JSON.stringify({ status: response.status, headers: Object.fromEntries(response.headers), body: text }),
);
