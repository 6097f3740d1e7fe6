-- KEYS: count recent
-- ARGV: url_prefix recent_leaf_prefix cursor limit (at least 1) prefix contains host budget budget_us
--   ->  {more, urls indexed, next cursor (hex of a 26-byte key, '' at the end), url, value, url, value, ...}
-- Rows come newest first, by (stored_at, SHA-1 of the URL) descending (lib_recent.lua), those at or after
-- the cursor (26 raw bytes, '' for the first page) skipped. A page runs past `limit` only to keep URLs with
-- the same key together, as the next cursor is a key. The leaves are read from the one below the cursor
-- downwards, LEAVES_AT_ONCE bounds at a time; each row's value comes from its URL bucket. With a filter
-- (lib_filter.lua) only matching URLs become rows, and once `budget` members have been looked at, or
-- `budget_us` µs have passed (the clock read every CLOCK_EVERY members), the page ends there, with fewer
-- rows than `limit` if so: each call holds Redis for a bounded time.
local LEAVES_AT_ONCE = 8
local FILTERED_READ = 256  -- members read at once while filtering
local CLOCK_EVERY = 64
local url_prefix, leaves, cursor, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local prefix, contains, host, budget, budget_us = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local filtered = prefix ~= '' or contains ~= '' or host ~= ''
local started, over = filtered and clock_us() or 0, false
local out = {0, tonumber(redis.call('HGET', KEYS[1], 'urls') or '0'), ''}
local taken, looked, last = 0, 0, nil
local below = cursor == '' and '+' or '(' .. cursor
local bounds, b = redis.call('ZREVRANGEBYLEX', KEYS[2], below, '-', 'LIMIT', 0, LEAVES_AT_ONCE), 1
while bounds[b] do
  local leaf, upper = recent_leaf(leaves, bounds[b]), below
  while true do
    local want = math.max(limit - taken, 0) + 1  -- one more, to see whether the page's last key goes on
    if filtered then want = FILTERED_READ end
    local members = redis.call('ZREVRANGEBYLEX', leaf, upper, '-', 'LIMIT', 0, want)
    for i = 1, #members do
      local member = members[i]
      local key = string.sub(member, 1, RECENT_KEY)
      if filtered and not over then
        over = looked >= budget or (looked % CLOCK_EVERY == 0 and looked > 0 and clock_us() - started >= budget_us)
      end
      if (taken >= limit or over) and key ~= last then
        out[1], out[3] = 1, recent_hex(last)
        return out
      end
      local url = string.sub(member, RECENT_KEY + 1)
      if not filtered or url_matches(url, prefix, contains, host) then
        local value = redis.call('HGET', url_prefix .. string.sub(redis.sha1hex(url), 1, 3), url)
        if value then
          out[#out + 1] = url
          out[#out + 1] = value
        end
        taken = taken + 1
      end
      looked, last = looked + 1, key
    end
    if #members < want then break end
    upper = '(' .. members[#members]
  end
  b = b + 1
  if not bounds[b] and #bounds == LEAVES_AT_ONCE then
    bounds, b = redis.call('ZREVRANGEBYLEX', KEYS[2], '(' .. bounds[#bounds], '-', 'LIMIT', 0, LEAVES_AT_ONCE), 1
  end
end
return out
