-- KEYS: URL buckets     ARGV: digest     ->  {url, url, ...}
-- The URLs in these buckets whose value names `digest`. The index keeps no digest -> URLs map, so a reverse
-- lookup reads every bucket; the caller sends a few buckets per call (Index.urls_of), so that no call holds
-- Redis for more than about a millisecond at a million URLs (BENCHMARKS.md, "Gallery").
local digest, out = ARGV[1], {}
for _, name in ipairs(KEYS) do
  local flat = redis.call('HGETALL', name)
  for i = 2, #flat, 2 do
    if string.sub(flat[i], 1, 64) == digest then out[#out + 1] = flat[i - 1] end
  end
end
return out
