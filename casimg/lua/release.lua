-- KEYS: url-bucket-of-url count recent
-- ARGV: url blob_prefix recent_leaf_prefix placeholder_prefix variants_prefix variant_refs_prefix
--   ->  {digest, references left, variant digest...} or nil
-- The record goes with the last reference: delete step 3 then reads 0 unless a store counted one since.
-- With it go the content's placeholder and its variants (drop_content): the digests after the first two
-- are variants that lost their last reference, for the caller's delete steps.
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
  return {digest, refs - 1}
end
redis.call('HDEL', key, raw)
if refs == 1 then redis.call('HINCRBY', KEYS[2], 'blobs', -1) end
local out = {digest, 0}
for _, freed in ipairs(drop_content(digest, ARGV[2], KEYS[2], ARGV[4], ARGV[5], ARGV[6])) do out[#out + 1] = freed end
return out
