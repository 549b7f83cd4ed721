-- wrk script used by bench/run.py.
--
-- BENCH_PATH: request target. An absolute URL ("http://127.0.0.1:PORT/small")
--             makes wrk speak forward-proxy style (absolute-form request line)
--             when wrk itself is pointed at the proxy; "/small" for direct runs.
-- BENCH_HOST: Host header to send (the origin's host:port, not the proxy's).
--
-- done() prints one machine-readable line, prefixed with BENCHJSON, that
-- run.py parses instead of scraping wrk's human summary.

local path = os.getenv("BENCH_PATH")
local host = os.getenv("BENCH_HOST")
if path and path ~= "" then
  wrk.path = path
end
if host and host ~= "" then
  wrk.headers["Host"] = host
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.2f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
