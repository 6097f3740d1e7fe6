-- KEYS: variants-of-source count claim
-- ARGV: source canonical value blob_prefix limit claim_token variant_refs_prefix  ->  {outcome, value}
-- Records a rendered variant, whose blob is linked in (store step 2 for a variant: the relation is its
-- reference), and ends the render's claim in the same step, so a waiter sees the claim or the relation,
-- never neither. value is "<variant sha256 hex> <size>". outcome: 1 recorded; 0 the source has no
-- reference left (deleted meanwhile); 2 recorded already (value: that one); 3 the source has `limit`
-- variants already; 4 the source is a variant only (every reference of it is a relation): variants are
-- made of originals, so that one original's allowance bounds what can be made of it. A variant whose
-- bytes are the source's own counts no reference (it would keep its source alive).
local source, canonical, value, blob_prefix, variant_refs_prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[7]
local variant = string.sub(value, 1, 64)
if redis.call('GET', KEYS[3]) == ARGV[6] then redis.call('DEL', KEYS[3]) end
local source_raw = unhex(source)
local refs = tonumber(redis.call('HGET', blob_prefix .. string.sub(source, 1, 3), source_raw) or '0') or 0
if refs < 1 then return {0, ''} end
local had = redis.call('HGET', KEYS[1], canonical)
if had then return {2, had} end
local as_variant = tonumber(redis.call('HGET', variant_refs_prefix .. string.sub(source, 1, 3), source_raw) or '0') or 0
if as_variant >= refs then return {4, ''} end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then return {3, ''} end
redis.call('HSET', KEYS[1], canonical, value)
if variant ~= source then
  local raw = unhex(variant)
  local prior = redis.call('HINCRBY', blob_prefix .. string.sub(variant, 1, 3), raw, 1) - 1
  if prior == 0 then redis.call('HINCRBY', KEYS[2], 'blobs', 1) end
  redis.call('HINCRBY', variant_refs_prefix .. string.sub(variant, 1, 3), raw, 1)
end
return {1, value}
