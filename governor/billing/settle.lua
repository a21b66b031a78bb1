-- Settle a reservation: drop its hold and charge the actual cost (0: a release).
-- KEYS 1-3 as in reserve.lua; KEYS[4] this reservation's settlement record, a string
-- "charge|before|after" that expires by itself (no TIME, no sweep).
-- ARGV: 1 reservation member, 2 amount held, 3 actual cost, 4 hour, 5 day (the
-- reservation's windows), 6 spending limit, 7 hourly, 8 daily (-1: none),
-- 9 reservation id (unused: KEYS[4] names it), 10 how long to remember the settlement (ms).
-- A charge above the hold is taken only as far as the balance and every budget still
-- allow: nothing ever goes below zero or over a budget.
-- Idempotent: a settlement retried after its reply was lost (Redis cut mid-call)
-- answers the first one's result and charges nothing twice.
local done = redis.call('GET', KEYS[4])
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

local acct = redis.call('HMGET', KEYS[1], 'balance', 'held')
local balance = tonumber(acct[1] or 0) or 0
local held = tonumber(acct[2] or 0) or 0
local fields = {}
-- The hold is gone already if the reservation expired and was reaped.
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
  held = held - held_amount
  fields = {'held', held}
  life = life - held_amount
  if same_h then hused = hused - held_amount end
  if same_d then dused = dused - held_amount end
end

local headroom = balance - held
local limit = tonumber(ARGV[6])
if limit >= 0 then headroom = math.min(headroom, limit - life) end
local hourly = tonumber(ARGV[7])
if hourly >= 0 and same_h then headroom = math.min(headroom, hourly - hused) end
local daily = tonumber(ARGV[8])
if daily >= 0 and same_d then headroom = math.min(headroom, daily - dused) end
local charge = math.max(0, math.min(actual, headroom))

local after = balance - charge
redis.call('HSET', KEYS[1], 'balance', after, unpack(fields))
fields = {'life', life + charge}
if same_h then table.insert(fields, 'h'); table.insert(fields, hused + charge) end
if same_d then table.insert(fields, 'd'); table.insert(fields, dused + charge) end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('SET', KEYS[4], charge .. '|' .. balance .. '|' .. after, 'PX', ARGV[10])
return {charge, balance, after}
