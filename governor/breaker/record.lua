-- Record how one admitted request on a model path ended, and make any transition.
-- KEYS[1] breaker hash, KEYS[2] probe leases.
-- ARGV[1] 'ok' | 'fail' | 'neutral', ARGV[2] probe id or '', ARGV[3] failure threshold,
-- ARGV[4] base open ms, ARGV[5] max open ms, ARGV[6] probe successes that close it.
-- Closed: consecutive failures (fleet-wide) open it at the threshold; a success resets.
-- Half-open: only a live probe's outcome counts; a failure re-opens for twice as long
-- as last time (capped), enough successes close it. Late outcomes change nothing.
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
local state = redis.call('HGET', h, 'state') or 'closed'
local forced = redis.call('HGET', h, 'forced') or ''
local is_probe = 0
if ARGV[2] ~= '' then is_probe = redis.call('ZREM', KEYS[2], ARGV[2]) end
local base = tonumber(ARGV[4])
if forced == '' and ARGV[1] ~= 'neutral' then
  if state == 'closed' then
    if ARGV[1] == 'fail' then
      local fails = redis.call('HINCRBY', h, 'fails', 1)
      if fails >= tonumber(ARGV[3]) then
        state = 'open'
        redis.call('HSET', h, 'state', state, 'open_ms', base, 'open_until', now + base,
                   'successes', 0)
      end
    elseif redis.call('HGET', h, 'fails') ~= '0' then
      redis.call('HSET', h, 'fails', 0)
    end
  elseif state == 'half-open' and is_probe == 1 then
    if ARGV[1] == 'fail' then
      local last = tonumber(redis.call('HGET', h, 'open_ms') or '0')
      local open_ms = math.min(math.max(last * 2, base), math.max(tonumber(ARGV[5]), base))
      state = 'open'
      redis.call('HSET', h, 'state', state, 'open_ms', open_ms, 'open_until', now + open_ms,
                 'successes', 0)
      redis.call('DEL', KEYS[2])
    else
      local ok = redis.call('HINCRBY', h, 'successes', 1)
      if ok >= tonumber(ARGV[6]) then
        state = 'closed'
        redis.call('HSET', h, 'state', state, 'fails', 0, 'successes', 0, 'open_ms', 0,
                   'open_until', 0)
        redis.call('DEL', KEYS[2])
      end
    end
  end
end
bump()
local remaining = 0
if state == 'open' then
  remaining = math.max(0, tonumber(redis.call('HGET', h, 'open_until') or '0') - now)
end
return {state, tonumber(redis.call('HGET', h, 'fails') or '0'), remaining,
        tonumber(redis.call('HGET', h, 'open_ms') or '0'), forced, 0,
        tonumber(redis.call('HGET', h, 'ver') or '0')}
