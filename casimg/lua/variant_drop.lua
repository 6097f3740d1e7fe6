-- KEYS: variants-of-source count
-- ARGV: canonical value blob_prefix placeholder_prefix variants_prefix variant_refs_prefix
--   ->  {removed (0 or 1), variant digest whose last reference went...}
-- fsck --repair's answer to a relation whose variant blob is missing: the relation goes (if it still holds
-- `value`) with its reference, and the next request renders the variant again.
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value ~= ARGV[2] then return {0} end
redis.call('HDEL', KEYS[1], ARGV[1])
local source = string.sub(KEYS[1], #ARGV[5] + 1)
local variant = string.sub(value, 1, 64)
local out = {1}
if variant == source then return out end
local bkey, raw = ARGV[3] .. string.sub(variant, 1, 3), unhex(variant)
local refs = tonumber(redis.call('HGET', bkey, raw) or '0') or 0
drop_variant_ref(ARGV[6], variant, raw)
if refs > 1 then
  redis.call('HINCRBY', bkey, raw, -1)
  return out
end
redis.call('HDEL', bkey, raw)
if refs == 1 then redis.call('HINCRBY', KEYS[2], 'blobs', -1) end
out[2] = variant
for _, freed in ipairs(drop_content(variant, ARGV[3], KEYS[2], ARGV[4], ARGV[5], ARGV[6])) do
  out[#out + 1] = freed
end
return out
