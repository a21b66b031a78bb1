-- Cancel a reservation whose reserve call failed on the client side (Redis cut or too
-- slow): release its hold if the call did run, and remember the id as settled so that
-- a copy of the call still on its way holds nothing (reserve.lua checks KEYS[4]).
-- KEYS: 1 account hash, 2 key hash (unused: the member names the key), 3 reservations
-- zset, 4 the reservation's settlement record (see settle.lua).
-- ARGV: 1 reservation id, 2 how long to remember it (ms), 3 prefix of key hashes.
local released = 0
local lead = ARGV[1] .. '|'
for _, m in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if string.sub(m, 1, #lead) == lead then
    local _, kid, amt, h, d = string.match(m, '^([^|]*)|([^|]*)|(%d+)|(%d+)|(%d+)$')
    if kid then
      amt = tonumber(amt)
      redis.call('HINCRBY', KEYS[1], 'held', -amt)
      local khash = ARGV[3] .. kid
      redis.call('HINCRBY', khash, 'life', -amt)
      local ids = redis.call('HMGET', khash, 'h_id', 'd_id')
      if tonumber(ids[1]) == tonumber(h) then redis.call('HINCRBY', khash, 'h', -amt) end
      if tonumber(ids[2]) == tonumber(d) then redis.call('HINCRBY', khash, 'd', -amt) end
    end
    redis.call('ZREM', KEYS[3], m)
    released = 1
  end
end
-- NX: a settlement already made keeps its record.
redis.call('SET', KEYS[4], '0|0|0', 'PX', ARGV[2], 'NX')
return released
