-- Check every limit of one request, then commit every one or none.
--
-- The sliding window counter of limits' Redis storage (acquire_sliding_window.lua),
-- generalised to several limits: phase 1 reads and decides, phase 2 writes, so a
-- request refused by one limit consumes nothing from the others. Same keys, same
-- TTLs, same weighting as limits, so limits' strategy reads these counters as its own.
-- Fewer calls than limits' script: one MGET reads every counter, a TTL is read only
-- when its value is used (a shift sets both TTLs; a zero previous count weighs nothing).
--
-- KEYS: previous_1, current_1, previous_2, current_2, ...
-- ARGV: amount_1, window_s_1, cost_1, amount_2, ...
-- Returns {granted, now_ms, then per limit: previous, previous_ttl_ms, current,
--          current_ttl_ms, fits}; counts are after the commit when granted; the
--          previous TTL is 0 when the previous count is (as the memory store reports).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
local cur_ttls, prev_ttls = {}, {}
for i = 1, n do
  local window = tonumber(ARGV[3 * i - 1]) * 1000
  local cur_key = KEYS[2 * i]
  local cur_ttl = tonumber(redis.call('pttl', cur_key))
  if cur_ttl > 0 and cur_ttl < window then
    -- The current window is over: it becomes the previous one (limits' shift), its
    -- TTL kept by RENAME; the new current one starts empty.
    redis.call('rename', cur_key, KEYS[2 * i - 1])
    redis.call('set', cur_key, 0, 'PX', cur_ttl + window)
    prev_ttls[i] = cur_ttl
    cur_ttl = cur_ttl + window
  end
  cur_ttls[i] = math.max(cur_ttl, 0)
end
local counts = redis.call('mget', unpack(KEYS))
local granted = 1
local state = {}
for i = 1, n do
  local amount = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1]) * 1000
  local cost = tonumber(ARGV[3 * i])
  local prev = tonumber(counts[2 * i - 1]) or 0
  local cur = tonumber(counts[2 * i]) or 0
  local prev_ttl = 0
  if prev ~= 0 then
    prev_ttl = prev_ttls[i] or math.max(tonumber(redis.call('pttl', KEYS[2 * i - 1])), 0)
  end
  local fits = 1
  if cost > amount or math.floor(prev * prev_ttl / window) + cur + cost > amount then
    fits = 0
    granted = 0
  end
  state[i] = {prev, prev_ttl, cur, cur_ttls[i], fits}
end
if granted == 1 then
  for i = 1, n do
    local window = tonumber(ARGV[3 * i - 1]) * 1000
    local cost = tonumber(ARGV[3 * i])
    local s = state[i]
    if s[4] == 0 then
      redis.call('set', KEYS[2 * i], cost, 'PX', 2 * window)
      s[3] = cost
      s[4] = 2 * window
    elseif cost ~= 0 then
      s[3] = redis.call('incrby', KEYS[2 * i], cost)
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
