-- KEYS: count (besides, it walks the URL buckets)     ARGV: url_prefix cursor limit (at least 1) placeholder_prefix
--   ->  {more, urls indexed, url, value, placeholder, url, value, placeholder, ...} (placeholder nil where
--   the content has none)
-- Rows come in SHA-1 order, a tie broken by the URL; those at or before the cursor (a SHA-1) are skipped.
-- A page runs past `limit` only to keep URLs with the same SHA-1 together, as the next cursor is a SHA-1.
-- Buckets go 16 at a time, the names built from the group's first two digits, and 16 empty ones cost one
-- EXISTS: a small index is mostly empty buckets (BENCHMARKS.md, "Figures behind design choices").
local url_prefix, cursor, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out, taken, prev, last = {0, tonumber(redis.call('HGET', KEYS[1], 'urls') or '0')}, 0, nil, nil
local first = 0
if cursor ~= '' then first = tonumber(string.sub(cursor, 1, 3), 16) end
for group = math.floor(first / 16), 255 do
  local stem = url_prefix .. HEX[math.floor(group / 16) + 1] .. HEX[group % 16 + 1]
  local names = {}
  for n = 1, 16 do names[n] = stem .. HEX[n] end
  if redis.call('EXISTS', unpack(names)) > 0 then
    for n = math.max(first - group * 16, 0) + 1, 16 do
      local flat = redis.call('HGETALL', names[n])
      local order, at = {}, {}
      for i = 1, #flat, 2 do
        local sha = redis.sha1hex(flat[i])
        if sha > cursor then
          local sortkey = sha .. flat[i]
          order[#order + 1] = sortkey
          at[sortkey] = i
        end
      end
      table.sort(order)
      for _, sortkey in ipairs(order) do
        if taken >= limit then
          last = last or string.sub(prev, 1, 40)
          if string.sub(sortkey, 1, 40) ~= last then
            out[1] = 1
            return out
          end
        end
        local i = at[sortkey]
        out[#out + 1] = flat[i]
        out[#out + 1] = flat[i + 1]
        local digest = string.sub(flat[i + 1], 1, 64)
        out[#out + 1] = redis.call('HGET', ARGV[4] .. string.sub(digest, 1, 3), unhex(digest))
        taken, prev = taken + 1, sortkey
      end
    end
  end
end
return out
