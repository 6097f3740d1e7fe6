-- Shared by release and the variant scripts: what goes with a content's last reference. Its placeholder
-- goes, and its variants: each of its relations is a reference of the variant's digest, released here in
-- turn (a variant asked of a variant by digest, before casimg refused those, has relations of its own), so
-- one step leaves nothing pointing nowhere. Returns the digests (hex) of the variants whose last reference
-- went, for the caller's blob delete steps. A relation to the content itself (a variant whose bytes are the
-- original's) counts no reference, so it is only dropped.

-- One relation that named `raw` (a variant's raw digest) is gone: its count of relation references drops.
local function drop_variant_ref(variant_refs_prefix, v, raw)
  local vkey = variant_refs_prefix .. string.sub(v, 1, 3)
  if redis.call('HINCRBY', vkey, raw, -1) < 1 then redis.call('HDEL', vkey, raw) end
end

local function drop_content(digest, blob_prefix, count_key, placeholder_prefix, variants_prefix, variant_refs_prefix)
  local freed, todo = {}, {digest}
  while #todo > 0 do
    local d = table.remove(todo)
    redis.call('HDEL', placeholder_prefix .. string.sub(d, 1, 3), unhex(d))
    redis.call('HDEL', variant_refs_prefix .. string.sub(d, 1, 3), unhex(d))
    local key = variants_prefix .. d
    local values = redis.call('HVALS', key)
    redis.call('DEL', key)
    for i = 1, #values do
      local v = string.sub(values[i], 1, 64)
      if v ~= d then
        local bkey, raw = blob_prefix .. string.sub(v, 1, 3), unhex(v)
        local refs = tonumber(redis.call('HGET', bkey, raw) or '0') or 0
        drop_variant_ref(variant_refs_prefix, v, raw)
        if refs > 1 then
          redis.call('HINCRBY', bkey, raw, -1)
        else
          redis.call('HDEL', bkey, raw)
          if refs == 1 then redis.call('HINCRBY', count_key, 'blobs', -1) end
          freed[#freed + 1] = v
          todo[#todo + 1] = v
        end
      end
    end
  end
  return freed
end
