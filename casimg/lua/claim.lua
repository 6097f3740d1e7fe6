-- KEYS: claims(d) deleting(d) tomb blob-bucket-of-d     ARGV: token ttl_ms digest raw_digest
--   ->  0: wait, a delete is in flight; 1: claimed; 2: claimed, and the object is there (d is referenced)
-- Store step 1 on an object store (storage/s3.py): hold a claim on the digest until the index step, so
-- the sweep deletes no object a store is about to count. Times are Redis's, the same for every node.
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)  -- every claim has the same TTL: the newest outlives the others
redis.call('ZREM', KEYS[3], ARGV[3])
-- A referenced digest has its object (the invariant), and the claim keeps it until our index step.
if tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0') > 0 then return 2 end
return 1
