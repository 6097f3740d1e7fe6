-- KEYS: count (besides, it walks the URL buckets)
-- ARGV: url_prefix cursor limit (at least 1) prefix contains host budget budget_us
--   ->  {more, urls indexed, next cursor (a SHA-1, '' at the end), url, value, url, value, ...}
-- Rows come in SHA-1 order, a tie broken by the URL; those at or before the cursor (a SHA-1) are skipped.
-- A page runs past `limit` only to keep URLs with the same SHA-1 together, as the next cursor is a SHA-1.
-- Buckets go 16 at a time, the names built from the group's first two digits, and 16 empty ones cost one
-- EXISTS: a small index is mostly empty buckets (BENCHMARKS.md, "Figures behind design choices").
-- With a filter (lib_filter.lua) only matching URLs become rows; a URL that does not match costs no SHA-1.
-- Once `budget` URLs have been looked at, or `budget_us` µs have passed, the page ends with the bucket it is in, with fewer rows than
-- `limit` if so, and the cursor is the greatest SHA-1 of that bucket: each call holds Redis for a bounded time.
local url_prefix, cursor, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local prefix, contains, host, budget, budget_us = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local filtered = prefix ~= '' or contains ~= '' or host ~= ''
local started = filtered and clock_us() or 0
local out, taken, prev, last = {0, tonumber(redis.call('HGET', KEYS[1], 'urls') or '0'), ''}, 0, nil, nil
local looked = 0
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
        if not filtered or url_matches(flat[i], prefix, contains, host) then
          local sha = redis.sha1hex(flat[i])
          if sha > cursor then
            local sortkey = sha .. flat[i]
            order[#order + 1] = sortkey
            at[sortkey] = i
          end
        end
      end
      -- The cursor's own bucket does not count: the page must get past it to end at a bucket's end.
      if cursor == '' or group * 16 + n - 1 > first then looked = looked + #flat / 2 end
      table.sort(order)
      for _, sortkey in ipairs(order) do
        if taken >= limit then
          last = last or string.sub(prev, 1, 40)
          if string.sub(sortkey, 1, 40) ~= last then
            out[1], out[3] = 1, last
            return out
          end
        end
        local i = at[sortkey]
        out[#out + 1] = flat[i]
        out[#out + 1] = flat[i + 1]
        taken, prev = taken + 1, sortkey
      end
      if filtered and (looked >= budget or clock_us() - started >= budget_us) and group * 16 + n < 4096 then
        -- The end of this bucket: past every SHA-1 in it, matching or not (and past its name, if empty).
        local edge = string.sub(names[n], -3) .. string.rep('0', 37)
        for i = 1, #flat, 2 do
          local sha = redis.sha1hex(flat[i])
          if sha > edge then edge = sha end
        end
        out[1], out[3] = 1, edge
        return out
      end
    end
  end
end
return out
