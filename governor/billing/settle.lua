-- Settle a reservation: drop its hold and charge the actual cost (0: a release).
-- KEYS 1-3 as in reserve.lua; KEYS[4] hash reservation id -> "charge|before|after" of
-- settlements already made, KEYS[5] zset reservation id -> when to forget it (ms).
-- ARGV: 1 reservation member, 2 amount held, 3 actual cost, 4 hour, 5 day (the
-- reservation's windows), 6 spending limit, 7 hourly, 8 daily (-1: none),
-- 9 reservation id, 10 how long to remember the settlement (ms).
-- A charge above the hold is taken only as far as the balance and every budget still
-- allow: nothing ever goes below zero or over a budget.
-- Idempotent: a settlement retried after its reply was lost (Redis cut mid-call)
-- answers the first one's result and charges nothing twice.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now_ms, 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
end
local done = redis.call('HGET', KEYS[4], ARGV[9])
if done then
  local c, b, a = string.match(done, '^(-?%d+)|(-?%d+)|(-?%d+)$')
  return {tonumber(c), tonumber(b), tonumber(a)}
end
local held_amount = tonumber(ARGV[2])
local actual = tonumber(ARGV[3])
local hour = tonumber(ARGV[4])
local day = tonumber(ARGV[5])

local k = redis.call('HMGET', KEYS[2], 'life', 'h_id', 'h', 'd_id', 'd')
local life = tonumber(k[1] or 0) or 0
local same_h = tonumber(k[2]) == hour
local same_d = tonumber(k[4]) == day
local hused = tonumber(k[3] or 0) or 0
local dused = tonumber(k[5] or 0) or 0

-- The hold is gone already if the reservation expired and was reaped.
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'held', -held_amount)
  life = life - held_amount
  if same_h then hused = hused - held_amount end
  if same_d then dused = dused - held_amount end
end

local acct = redis.call('HMGET', KEYS[1], 'balance', 'held')
local balance = tonumber(acct[1] or 0) or 0
local held = tonumber(acct[2] or 0) or 0
local headroom = balance - held
local limit = tonumber(ARGV[6])
if limit >= 0 then headroom = math.min(headroom, limit - life) end
local hourly = tonumber(ARGV[7])
if hourly >= 0 and same_h then headroom = math.min(headroom, hourly - hused) end
local daily = tonumber(ARGV[8])
if daily >= 0 and same_d then headroom = math.min(headroom, daily - dused) end
local charge = math.max(0, math.min(actual, headroom))

local after = balance - charge
redis.call('HSET', KEYS[1], 'balance', after)
local fields = {'life', life + charge}
if same_h then table.insert(fields, 'h'); table.insert(fields, hused + charge) end
if same_d then table.insert(fields, 'd'); table.insert(fields, dused + charge) end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('HSET', KEYS[4], ARGV[9], charge .. '|' .. balance .. '|' .. after)
redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[10]), ARGV[9])
return {charge, balance, after}
