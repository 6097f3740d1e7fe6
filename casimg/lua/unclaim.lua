-- KEYS: claims(d)     ARGV: token  ->  1 if the claim was still live (unexpired), else 0; it is gone after
-- Store step 4 on an object store: a claim live now was live since it was taken (expiry only moves
-- forward in time), so no sweep could have deleted the object between the upload and the index step.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
redis.call('ZREM', KEYS[1], ARGV[1])
if expiry > now_ms then return 1 end
return 0
