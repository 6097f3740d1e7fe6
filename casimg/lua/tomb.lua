-- KEYS: blob-bucket-of-d tomb     ARGV: raw_digest digest grace_ms  ->  1 if tombstoned, 0 if referenced
-- Delete step 2 on an object store: no object is deleted on the request path; the sweep deletes it once
-- `grace_ms` have passed, if nothing references or claims it by then (begin_delete.lua).
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then return 0 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[2], 'NX', now_ms + tonumber(ARGV[3]), ARGV[2])
return 1
