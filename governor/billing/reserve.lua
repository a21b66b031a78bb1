-- Reserve credits against an account's balance and a key's budgets, all or nothing.
-- KEYS[1] account hash {balance, held}; KEYS[2] key hash {life, h_id, h, d_id, d};
-- KEYS[3] reservations zset (member "id|key|amount|hour|day", score = expiry ms).
-- ARGV: 1 opening balance, 2 amount, 3 reservation id, 4 key id, 5 lease ms,
--       6 spending limit, 7 hourly budget, 8 daily budget (-1: none),
--       9 prefix of this account's key hashes (to release reaped reservations).
-- KEYS[4] this reservation's settlement record (see settle.lua): a reservation
-- cancelled before this call ran (its reply was given up on) holds nothing.
-- Windows are UTC calendar hours/days on the Redis server's TIME (one clock for all).
local t = redis.call('TIME')
local now = tonumber(t[1])
local now_ms = now * 1000 + math.floor(tonumber(t[2]) / 1000)
local hour = math.floor(now / 3600)
local day = math.floor(now / 86400)

local function unhold(khash, amount, h, d)
  redis.call('HINCRBY', khash, 'life', -amount)
  local ids = redis.call('HMGET', khash, 'h_id', 'd_id')
  if tonumber(ids[1]) == h then redis.call('HINCRBY', khash, 'h', -amount) end
  if tonumber(ids[2]) == d then redis.call('HINCRBY', khash, 'd', -amount) end
end

-- Reservations whose request never settled (a dead worker) are released. The key
-- hashes named here share KEYS[1]'s hash tag, so they live in the same cluster slot.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, 100)
for _, m in ipairs(expired) do
  local _, kid, amt, h, d = string.match(m, '^([^|]*)|([^|]*)|(%d+)|(%d+)|(%d+)$')
  if kid then
    amt = tonumber(amt)
    redis.call('HINCRBY', KEYS[1], 'held', -amt)
    unhold(ARGV[9] .. kid, amt, tonumber(h), tonumber(d))
  end
  redis.call('ZREM', KEYS[3], m)
end

if redis.call('EXISTS', KEYS[4]) == 1 then
  return {0, 'cancelled', 0, -1, hour, day}
end

local acct = redis.call('HMGET', KEYS[1], 'balance', 'held')
if not acct[1] then
  -- First use: the opening balance is the account's from now on (even if refused).
  redis.call('HSET', KEYS[1], 'balance', ARGV[1])
  acct[1] = ARGV[1]
end
local balance = tonumber(acct[1])
local held = tonumber(acct[2] or 0) or 0
local amount = tonumber(ARGV[2])

local k = redis.call('HMGET', KEYS[2], 'life', 'h_id', 'h', 'd_id', 'd')
local life = tonumber(k[1] or 0) or 0
local hused = 0
if tonumber(k[2]) == hour then hused = tonumber(k[3] or 0) or 0 end
local dused = 0
if tonumber(k[4]) == day then dused = tonumber(k[5] or 0) or 0 end

local available = balance - held
if available < amount then
  return {0, 'balance', available, -1, hour, day}
end
local limit = tonumber(ARGV[6])
if limit >= 0 and life + amount > limit then
  return {0, 'spending_limit', limit - life, -1, hour, day}
end
local hourly = tonumber(ARGV[7])
if hourly >= 0 and hused + amount > hourly then
  return {0, 'hourly_budget', hourly - hused, (hour + 1) * 3600000 - now_ms, hour, day}
end
local daily = tonumber(ARGV[8])
if daily >= 0 and dused + amount > daily then
  return {0, 'daily_budget', daily - dused, (day + 1) * 86400000 - now_ms, hour, day}
end

redis.call('HINCRBY', KEYS[1], 'held', amount)
redis.call('HSET', KEYS[2], 'life', life + amount, 'h_id', hour, 'h', hused + amount,
  'd_id', day, 'd', dused + amount)
local member = ARGV[3] .. '|' .. ARGV[4] .. '|' .. amount .. '|' .. hour .. '|' .. day
redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[5]), member)
return {1, '', available, 0, hour, day}
