-- wrk script for bench/webhooks.py: POST a different pre-signed webhook on every request.
-- wrk -t1 -c16 -d10s -s bench/webhook.lua http://127.0.0.1:PORT/webhook -- BODIES
-- BODIES has one "hex-signature<TAB>json-body" per line; each body has its own message id.

local requests, n, i = {}, 0, 0

function init(args)
  for line in io.lines(args[1]) do
    local sig, body = line:match("^(%x+)\t(.*)$")
    n = n + 1
    requests[n] = wrk.format("POST", nil,
      {["Content-Type"] = "application/json", ["X-Spark-Signature"] = sig}, body)
  end
end

function request()
  i = i % n + 1
  return requests[i]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '\nJSON {"requests": %d, "duration_us": %d, "errors": %d, "non_2xx_3xx": %d,'
      .. ' "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
