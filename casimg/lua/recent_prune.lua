-- KEYS: recent     ARGV: url_prefix recent_leaf_prefix bound  ->  members removed
-- fsck --repair: drops from the leaf at `bound` the members whose URL is no longer indexed with that
-- stored_at (what a process older than the newest-first order, or a lost write, may leave).
local removed = 0
local members = redis.call('ZRANGE', recent_leaf(ARGV[2], ARGV[3]), 0, -1)
for i = 1, #members do
  local url = string.sub(members[i], RECENT_KEY + 1)
  local value = redis.call('HGET', ARGV[1] .. string.sub(redis.sha1hex(url), 1, 3), url)
  local stored_at = value and string.match(value, '^%S+ (%d+)')
  if not stored_at or recent_member(stored_at, url) ~= members[i] then
    recent_remove(KEYS[1], ARGV[2], members[i])
    removed = removed + 1
  end
end
return removed
