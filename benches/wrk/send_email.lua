-- wrk posting stateless JSON-RPC `tools/call send_email` to a daemon
-- started with `serve --http ADDR --stateless` (JSON responses, no session).
-- Each request is one 1 KiB message; the summary counts the answers that
-- say "sent", so that a fast error is never counted as a delivery.
--
--   wrk -t2 -c32 -d10s -s benches/wrk/send_email.lua http://127.0.0.1:8025/mcp
--
-- The body size can be set with WRK_BODY_BYTES (default 1024).
-- WRK_PROTOCOL=2026-07-28 posts each call as a client of that version does
-- (the standard headers, the version and the client's capabilities in
-- `_meta`), which a daemon with sessions serves without one too;
-- WRK_META_EXTRA=1 adds a member of another namespace to `_meta`, which
-- leaves the call to rmcp's own service (to compare the two).

local size = tonumber(os.getenv("WRK_BODY_BYTES") or "1024")
local line = "The quick brown fox jumps over the lazy dog 0123456789 abcdefghij\\n"
local body = string.rep(line, math.ceil(size / 64)):sub(1, size)
local protocol = os.getenv("WRK_PROTOCOL") or "2025-06-18"
local meta = ""
if protocol >= "2026-07-28" then
  meta = '"_meta":{"io.modelcontextprotocol/protocolVersion":"' .. protocol .. '",'
    .. '"io.modelcontextprotocol/clientCapabilities":{},'
    .. '"io.modelcontextprotocol/clientInfo":{"name":"wrk","version":"1"}'
  if os.getenv("WRK_META_EXTRA") == "1" then
    meta = meta .. ',"example.org/trace":"t"'
  end
  meta = meta .. '},'
elseif os.getenv("WRK_META_EXTRA") == "1" then
  meta = '"_meta":{"example.org/trace":"t"},'
end

local threads = {}
counter = 0
sent = 0
other = 0

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Accept"] = "application/json, text/event-stream"
  wrk.headers["MCP-Protocol-Version"] = protocol
  if protocol >= "2026-07-28" then
    wrk.headers["Mcp-Method"] = "tools/call"
    wrk.headers["Mcp-Name"] = "send_email"
  end
end

function request()
  counter = counter + 1
  local payload = string.format(
    '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{%s"name":"send_email",'
      .. '"arguments":{"to":["rcpt@localhost"],"subject":"wrk %d-%d","body":"%s"}}}',
    counter, meta, id, counter, body)
  return wrk.format(nil, nil, nil, payload)
end

function response(status, headers, resp)
  if status == 200 and resp:find('"status":"sent"', 1, true) then
    sent = sent + 1
  else
    other = other + 1
    if other == 1 then
      print("first answer not sent: " .. status .. " " .. resp:sub(1, 300))
    end
  end
end

function done(summary, latency, requests)
  local s, o = 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    o = o + t:get("other")
  end
  io.write(string.format("answers: %d sent, %d other; %.0f sent/s; p50 %.2f ms, p99 %.2f ms\n",
    s, o, s / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
