-- Test script: add ARGV[1] to KEYS[1]; answer the new value and the server's time in ms.
local t = redis.call('TIME')
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], 60000)
return {v, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
