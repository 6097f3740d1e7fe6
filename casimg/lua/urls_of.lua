-- KEYS: none (it walks the URL buckets)     ARGV: url_prefix digest first_group groups
--   ->  {the next group to walk, or -1 after the last, url, url, ...}
-- The URLs whose value names `digest`, in `groups` groups of 16 buckets from `first_group`: the index keeps
-- no digest -> URLs map, so a reverse lookup reads every bucket, a few groups per call, so that one call
-- holds Redis for a few milliseconds even at a million URLs (BENCHMARKS.md, "Gallery").
local url_prefix, digest, first, groups = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {-1}
local last = math.min(first + groups - 1, 255)
for group = first, last do
  local stem = url_prefix .. HEX[math.floor(group / 16) + 1] .. HEX[group % 16 + 1]
  local names = {}
  for n = 1, 16 do names[n] = stem .. HEX[n] end
  if redis.call('EXISTS', unpack(names)) > 0 then
    for n = 1, 16 do
      local flat = redis.call('HGETALL', names[n])
      for i = 1, #flat, 2 do
        if string.sub(flat[i + 1], 1, 64) == digest then out[#out + 1] = flat[i] end
      end
    end
  end
end
if last < 255 then out[1] = last + 1 end
return out
