-- The operator's override of a model path, shared by every worker.
-- KEYS[1] breaker hash, KEYS[2] probe leases. ARGV[1] 'open' | 'closed' | 'clear' | 'reset'.
-- 'open'/'closed' hold that state whatever the traffic does; 'clear' drops the hold and
-- keeps the automatic state; 'reset' drops it and closes with fresh counters.
-- Reply: {state, fails, remaining_ms, open_ms, forced, granted=0, version}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = KEYS[1]
-- The version only grows (past Redis TIME in ms, so even after a flush): a worker keeps
-- the newest of the replies it gets, whatever order they arrive in.
local function bump()
  local v = math.max(tonumber(redis.call('HGET', h, 'ver') or '0') + 1, now)
  redis.call('HSET', h, 'ver', v)
end
local action = ARGV[1]
if action == 'open' or action == 'closed' then
  redis.call('HSET', h, 'forced', action)
  redis.call('DEL', KEYS[2])
elseif action == 'clear' then
  redis.call('HDEL', h, 'forced')
else
  redis.call('HDEL', h, 'forced')
  redis.call('HSET', h, 'state', 'closed', 'fails', 0, 'successes', 0, 'open_ms', 0,
             'open_until', 0)
  redis.call('DEL', KEYS[2])
end
bump()
local state = redis.call('HGET', h, 'state') or 'closed'
local remaining = 0
if state == 'open' then
  remaining = math.max(0, tonumber(redis.call('HGET', h, 'open_until') or '0') - now)
end
return {state, tonumber(redis.call('HGET', h, 'fails') or '0'), remaining,
        tonumber(redis.call('HGET', h, 'open_ms') or '0'), redis.call('HGET', h, 'forced') or '',
        0, tonumber(redis.call('HGET', h, 'ver') or '0')}
