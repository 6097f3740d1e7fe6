-- KEYS: none (it scans)     ARGV: variants_prefix match_pattern  ->  {source, canonical, value, ...}
-- Every variant relation, read in one step for fsck (a SCAN of the keys matching the prefix).
local out, seen, cursor = {}, {}, '0'
repeat
  local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[2], 'COUNT', 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do
    if not seen[key] then
      seen[key] = true
      local source = string.sub(key, #ARGV[1] + 1)
      local flat = redis.call('HGETALL', key)
      for i = 1, #flat, 2 do
        out[#out + 1] = source
        out[#out + 1] = flat[i]
        out[#out + 1] = flat[i + 1]
      end
    end
  end
until cursor == '0'
return out
