-- Ask to send one half-open probe on a model path, fleet-wide.
-- KEYS[1] breaker hash, KEYS[2] probe leases (ZSET member=probe id, score=deadline ms).
-- ARGV[1] probe id, ARGV[2] max probes, ARGV[3] lease ms.
-- An open breaker whose time is up turns half-open here, on Redis TIME; a probe is a
-- lease with a deadline, so a crashed worker's probe frees its place when it expires.
-- Reply: {state, fails, remaining_ms, open_ms, forced, granted, version}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = KEYS[1]
-- The version only grows (past Redis TIME in ms, so even after a flush): a worker keeps
-- the newest of the replies it gets, whatever order they arrive in.
local function bump()
  local v = math.max(tonumber(redis.call('HGET', h, 'ver') or '0') + 1, now)
  redis.call('HSET', h, 'ver', v)
end
local state = redis.call('HGET', h, 'state') or 'closed'
local forced = redis.call('HGET', h, 'forced') or ''
local open_until = tonumber(redis.call('HGET', h, 'open_until') or '0')
local granted = 0
if forced == '' then
  if state == 'open' and now >= open_until then
    state = 'half-open'
    redis.call('HSET', h, 'state', state, 'successes', 0)
    redis.call('DEL', KEYS[2])
    bump()
  end
  if state == 'half-open' then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
      redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
      granted = 1
    end
  end
end
local remaining = 0
if state == 'open' then remaining = math.max(0, open_until - now) end
return {state, tonumber(redis.call('HGET', h, 'fails') or '0'), remaining,
        tonumber(redis.call('HGET', h, 'open_ms') or '0'), forced, granted,
        tonumber(redis.call('HGET', h, 'ver') or '0')}
