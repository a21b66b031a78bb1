-- One strike against a key; suspends it when the strikes reach the threshold.
-- KEYS[1] strikes counter, KEYS[2] suspension record (same {key id} hash tag).
-- ARGV[1] strike TTL ms, ARGV[2] strikes to suspend, ARGV[3] suspension record (JSON).
-- Returns {strikes, suspended (1 if the key is now suspended)}.
local strikes = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if strikes >= tonumber(ARGV[2]) then
  -- No TTL: a suspension lasts until an operator lifts it. Keep the first record.
  redis.call('SET', KEYS[2], ARGV[3], 'NX')
  return {strikes, 1}
end
return {strikes, 0}
