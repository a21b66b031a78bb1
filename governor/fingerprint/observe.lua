-- Behaviour of one key over time: distinct devices, sessions and client addresses
-- seen within their windows. Time from Redis TIME, so every worker agrees.
-- KEYS[1..3] sorted sets (devices, sessions, addresses) under one {key id} hash tag.
-- ARGV[3i-2] member ('' = none), ARGV[3i-1] window ms, ARGV[3i] cap on members kept.
-- Returns the distinct count of each set (0 when the member was empty).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {}
for i = 1, 3 do
  local member = ARGV[3 * i - 2]
  local window = tonumber(ARGV[3 * i - 1])
  local cap = tonumber(ARGV[3 * i])
  if member == '' then
    counts[i] = 0
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
    redis.call('ZADD', KEYS[i], now, member)
    -- Bounded: keep the newest `cap` members (enough to stay over any limit below it).
    redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -(cap + 1))
    redis.call('PEXPIRE', KEYS[i], window)
    counts[i] = redis.call('ZCARD', KEYS[i])
  end
end
return counts
