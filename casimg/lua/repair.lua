-- KEYS: count     ARGV: url_prefix blob_prefix placeholder_prefix variants_prefix variants_match
--                        variant_refs_prefix
--   ->  list of the fixes made, for fsck's report
-- Moves URLs to the bucket their SHA-1 names, recounts references from the URLs and the variant relations
-- of referenced contents, drops the relations of contents nothing references, drops records nothing points
-- at (and records in the wrong bucket, recreated in the right one) and the placeholders of contents
-- without a record, recounts the references that are relations (variant-refs), and sets the counts.
redis.replicate_commands()  -- Redis 6: write after SCAN
local function tohex(raw) return string.format(string.rep('%02x', 32), string.byte(raw, 1, 32)) end
local url_prefix, blob_prefix = ARGV[1], ARGV[2]
local fixes, counts, urls = {}, {}, 0
for b = 0, 4095 do
  local key = url_prefix .. bucket_name(b)
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local url, value = flat[i], flat[i + 1]
    local right = tonumber(string.sub(redis.sha1hex(url), 1, 3), 16)
    local counted = true
    if right ~= b then
      redis.call('HDEL', key, url)
      if redis.call('HSETNX', url_prefix .. bucket_name(right), url, value) == 1 then
        fixes[#fixes + 1] = 'moved ' .. url .. ' from bucket ' .. bucket_name(b) .. ' to ' .. bucket_name(right)
        counted = right < b  -- a bucket still ahead counts it when the walk gets there
      else
        fixes[#fixes + 1] = 'dropped a second entry of ' .. url .. ' from bucket ' .. bucket_name(b)
        counted = false
      end
    end
    if counted then
      local digest = string.sub(value, 1, 64)
      counts[digest] = (counts[digest] or 0) + 1
      urls = urls + 1
    end
  end
end
-- Variant relations: those of a referenced content count as references of their variants, which may have
-- variants in turn (asked for by digest), hence the rounds until nothing more is reached.
local variants_prefix, sources, cursor = ARGV[4], {}, '0'
repeat
  local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[5], 'COUNT', 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do sources[string.sub(key, #variants_prefix + 1)] = true end
until cursor == '0'
local as_variant = {}  -- digest -> its references that are relations
local reached = true
while reached do
  reached = false
  for source in pairs(sources) do
    if counts[source] then
      sources[source] = nil
      reached = true
      local values = redis.call('HVALS', variants_prefix .. source)
      for i = 1, #values do
        local variant = string.sub(values[i], 1, 64)
        if variant ~= source then
          counts[variant] = (counts[variant] or 0) + 1
          as_variant[variant] = (as_variant[variant] or 0) + 1
        end
      end
    end
  end
end
for source in pairs(sources) do
  redis.call('DEL', variants_prefix .. source)
  fixes[#fixes + 1] = 'dropped the variant relations of ' .. source .. ': nothing references it'
end
local recorded, stray = {}, {}
for b = 0, 4095 do
  local key = blob_prefix .. bucket_name(b)
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local digest = tohex(flat[i])
    local refs = tonumber(flat[i + 1]) or 0
    local want = counts[digest] or 0
    if want == 0 then
      redis.call('HDEL', key, flat[i])
      fixes[#fixes + 1] = 'dropped the record of ' .. digest .. ' (refs ' .. refs .. '): no URL points at it'
    elseif string.sub(digest, 1, 3) ~= bucket_name(b) then
      redis.call('HDEL', key, flat[i])
      stray[digest] = true
      fixes[#fixes + 1] = 'took the record of ' .. digest .. ' out of bucket ' .. bucket_name(b) .. ', not its own'
    else
      recorded[digest] = true
      if want ~= refs then
        redis.call('HSET', key, flat[i], want)
        fixes[#fixes + 1] = 'refs of ' .. digest .. ': ' .. refs .. ' -> ' .. want
      end
    end
  end
end
local blobs = 0
for digest, n in pairs(counts) do
  if not recorded[digest] then
    redis.call('HSET', blob_prefix .. string.sub(digest, 1, 3), unhex(digest), n)
    if not stray[digest] then fixes[#fixes + 1] = 'refs of ' .. digest .. ': 0 -> ' .. n .. ' (no record)' end
  end
  blobs = blobs + 1
end
for b = 0, 4095 do
  local key = ARGV[3] .. bucket_name(b)
  local fields = redis.call('HKEYS', key)
  for i = 1, #fields do
    local digest = tohex(fields[i])
    if not counts[digest] then
      redis.call('HDEL', key, fields[i])
      fixes[#fixes + 1] = 'dropped the placeholder of ' .. digest .. ': nothing references it'
    end
  end
end
local variant_refs_prefix, counted = ARGV[6], {}
for b = 0, 4095 do
  local key = variant_refs_prefix .. bucket_name(b)
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local digest = tohex(flat[i])
    local want = as_variant[digest] or 0
    if string.sub(digest, 1, 3) ~= bucket_name(b) or want == 0 then
      redis.call('HDEL', key, flat[i])
      if want > 0 then fixes[#fixes + 1] = 'took the relation count of ' .. digest .. ' out of bucket ' .. bucket_name(b)
      else fixes[#fixes + 1] = 'relation references of ' .. digest .. ': ' .. flat[i + 1] .. ' -> 0' end
    else
      counted[digest] = true
      if tostring(want) ~= flat[i + 1] then
        redis.call('HSET', key, flat[i], want)
        fixes[#fixes + 1] = 'relation references of ' .. digest .. ': ' .. flat[i + 1] .. ' -> ' .. want
      end
    end
  end
end
for digest, n in pairs(as_variant) do
  if not counted[digest] then
    redis.call('HSET', variant_refs_prefix .. string.sub(digest, 1, 3), unhex(digest), n)
    fixes[#fixes + 1] = 'relation references of ' .. digest .. ': none recorded -> ' .. n
  end
end
local had = redis.call('HMGET', KEYS[1], 'urls', 'blobs')
local had_urls, had_blobs = tonumber(had[1] or '0'), tonumber(had[2] or '0')
if had_urls ~= urls or had_blobs ~= blobs then
  redis.call('HSET', KEYS[1], 'urls', urls, 'blobs', blobs)
  fixes[#fixes + 1] = 'count: urls ' .. had_urls .. ' -> ' .. urls .. ', blobs ' .. had_blobs .. ' -> ' .. blobs
end
return fixes
