-- KEYS: old_urls old_order count     ARGV: url_prefix blob_prefix old_meta_prefix now_ms url...  ->  moved
local moved = 0
for i = 5, #ARGV do
  local url = ARGV[i]
  local digest = redis.call('HGET', KEYS[1], url)
  if digest then
    local key = ARGV[1] .. string.sub(redis.sha1hex(url), 1, 3)
    -- Already in the new layout (stored again since): that entry wins, and the old one just goes.
    if redis.call('HEXISTS', key, url) == 0 then
      local score = redis.call('ZSCORE', KEYS[2], url)
      local stamp = ARGV[4]
      if score then stamp = string.format('%.0f', math.floor(tonumber(score) / 1000)) end  -- µs -> ms
      local meta = redis.call('HGET', ARGV[3] .. string.sub(digest, 1, 3), digest)
      if meta then stamp = stamp .. ' ' .. meta end
      redis.call('HSET', key, url, digest .. ' ' .. stamp)
      local refs = redis.call('HINCRBY', ARGV[2] .. string.sub(digest, 1, 3), unhex(digest), 1) - 1
      redis.call('HINCRBY', KEYS[3], 'urls', 1)
      if refs == 0 then redis.call('HINCRBY', KEYS[3], 'blobs', 1) end
      moved = moved + 1
    end
    redis.call('HDEL', KEYS[1], url)
    redis.call('ZREM', KEYS[2], url)
  end
end
return moved
