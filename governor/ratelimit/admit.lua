-- Check every limit of one request, then commit every one or none.
--
-- The sliding window counter of limits' Redis storage (acquire_sliding_window.lua),
-- generalised to several limits: phase 1 reads and decides, phase 2 writes, so a
-- request refused by one limit consumes nothing from the others. Same keys, same
-- TTLs, same weighting as limits, so limits' strategy reads these counters as its own.
--
-- KEYS: previous_1, current_1, previous_2, current_2, ...
-- ARGV: amount_1, window_s_1, cost_1, amount_2, ...
-- Returns {granted, now_ms, then per limit: previous, previous_ttl_ms, current,
--          current_ttl_ms, fits}; counts are after the commit when granted.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
local granted = 1
local state = {}
for i = 1, n do
  local prev_key, cur_key = KEYS[2 * i - 1], KEYS[2 * i]
  local amount = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1]) * 1000
  local cost = tonumber(ARGV[3 * i])
  local cur_ttl = tonumber(redis.call('pttl', cur_key))
  if cur_ttl > 0 and cur_ttl < window then
    -- The current window is over: it becomes the previous one (limits' shift).
    redis.call('rename', cur_key, prev_key)
    redis.call('set', cur_key, 0, 'PX', cur_ttl + window)
  end
  local prev = tonumber(redis.call('get', prev_key)) or 0
  local prev_ttl = math.max(tonumber(redis.call('pttl', prev_key)), 0)
  local cur = tonumber(redis.call('get', cur_key)) or 0
  cur_ttl = math.max(tonumber(redis.call('pttl', cur_key)), 0)
  local fits = 1
  if cost > amount or math.floor(prev * prev_ttl / window) + cur + cost > amount then
    fits = 0
    granted = 0
  end
  state[i] = {prev, prev_ttl, cur, cur_ttl, fits}
end
if granted == 1 then
  for i = 1, n do
    local window = tonumber(ARGV[3 * i - 1]) * 1000
    local cost = tonumber(ARGV[3 * i])
    local s = state[i]
    if s[4] > 0 then
      s[3] = redis.call('incrby', KEYS[2 * i], cost)
    else
      redis.call('set', KEYS[2 * i], cost, 'PX', 2 * window)
      s[3] = cost
      s[4] = 2 * window
    end
  end
end
local out = {granted, now}
for i = 1, n do
  for j = 1, 5 do
    out[#out + 1] = state[i][j]
  end
end
return out
