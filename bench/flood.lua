-- Every request from a new source address (X-Forwarded-For, trusted from 127.0.0.1).
local n = 0
request = function()
  n = n + 1
  local v = n * 104729 + math.random(0, 104728)
  local ip = string.format("%d.%d.%d.%d", 10 + math.floor(v / 16777216) % 200, math.floor(v / 65536) % 256, math.floor(v / 256) % 256, v % 256)
  return wrk.format("GET", "/f", {["X-Forwarded-For"] = ip})
end
