-- KEYS: blob-bucket-of-d claims(d) deleting(d) tomb     ARGV: raw_digest digest marker_ttl_ms
--   ->  1: delete the object now (the marker is set); 0: leave it (referenced, claimed, not due, or taken)
-- The sweep's step 1 on an object store. Ordered by Redis against claim.lua: a claim taken before this
-- keeps the object; one asked for after it waits until end_delete (or the marker's TTL, which outlives
-- any DELETE in flight) and then uploads the object afresh.
local due = redis.call('ZSCORE', KEYS[4], ARGV[2])
if not due then return 0 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if tonumber(due) > now_ms then return 0 end
redis.call('ZREM', KEYS[4], ARGV[2])
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then return 0 end
if redis.call('ZCOUNT', KEYS[2], '(' .. now_ms, '+inf') > 0 then return 0 end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
return 1
