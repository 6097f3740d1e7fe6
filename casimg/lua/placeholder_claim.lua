-- KEYS: placeholder-todo     ARGV: now_ms lease_ms count
-- A filler's claim: up to `count` digests due by now, each moved to the end of its lease, so that a filler
-- that dies (or is killed) leaves them due again when the lease ends. Returns the digests (hex).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local lease_end = tonumber(ARGV[1]) + tonumber(ARGV[2])
for i = 1, #due do redis.call('ZADD', KEYS[1], 'XX', lease_end, due[i]) end
return due
