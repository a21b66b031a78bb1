-- First sighting of a request body: remember who sent it; later, say who did.
-- KEYS[1] body-hash key. ARGV[1] "<key id> <address>", ARGV[2] TTL ms.
-- Returns the first sender when the body was seen before (and differs), else false.
local first = redis.call('GET', KEYS[1])
if not first then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return first
