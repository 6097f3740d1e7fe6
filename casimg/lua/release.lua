-- KEYS: url-bucket-of-url count recent     ARGV: url blob_prefix recent_leaf_prefix  ->  {digest, references left} or nil
-- The record goes with the last reference: delete step 3 then reads 0 unless a store counted one since.
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return nil end
local digest = string.sub(value, 1, 64)
local stored_at = string.match(value, '^%S+ (%d+)')
local key, raw = ARGV[2] .. string.sub(digest, 1, 3), unhex(digest)
local refs = tonumber(redis.call('HGET', key, raw) or '0')
-- Checked before any write: Redis keeps the writes of a script that fails halfway.
if not refs then return redis.error_reply('the record of ' .. digest .. ' is not a count: run casimg fsck --repair') end
redis.call('HDEL', KEYS[1], ARGV[1])
if stored_at then recent_remove(KEYS[3], ARGV[3], recent_member(stored_at, ARGV[1])) end
redis.call('HINCRBY', KEYS[2], 'urls', -1)
if refs > 1 then
  redis.call('HINCRBY', key, raw, -1)
else
  redis.call('HDEL', key, raw)
  if refs == 1 then redis.call('HINCRBY', KEYS[2], 'blobs', -1) end
end
return {digest, math.max(refs - 1, 0)}
