-- Settle earlier hits: add a delta (negative: refund, positive: debt) to the window
-- counter each hit landed in, if that window still weighs (current or previous).
--
-- A window of limits' Redis storage is known by its absolute expiry time: the shift
-- renames the current counter to the previous key keeping its TTL. The hit recorded
-- that time (now + PTTL of the current key); the counter whose expiry (PEXPIRETIME,
-- so no TIME call) is within TOLERANCE of it is the one. Counters never go below zero.
--
-- KEYS: previous_1, current_1, previous_2, current_2, ...
-- ARGV: window_id_ms_1, delta_1, window_id_ms_2, delta_2, ...
-- Returns the number of counters adjusted.
local TOLERANCE = 250
local done = 0
for i = 1, #KEYS / 2 do
  local wid = tonumber(ARGV[2 * i - 1])
  local delta = tonumber(ARGV[2 * i])
  for _, key in ipairs({KEYS[2 * i], KEYS[2 * i - 1]}) do
    -- -2: no such key, -1: no expiry (not a window counter).
    local expires = tonumber(redis.call('pexpiretime', key))
    if expires > 0 and math.abs(expires - wid) <= TOLERANCE then
      if redis.call('incrby', key, delta) < 0 then
        redis.call('set', key, 0, 'KEEPTTL')
      end
      done = done + 1
      break
    end
  end
end
return done
