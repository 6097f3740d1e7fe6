-- KEYS: recent     ARGV: url_prefix recent_leaf_prefix url stored_at url stored_at ...  ->  members added
-- Gives each URL its member in the newest-first order (lib_recent.lua), if its value still holds that
-- stored_at (a URL released or stored again since has its place from its own store, or none); a URL that
-- has its member already keeps it. migrate.py sends every indexed URL through here once, a batch a call.
local added = 0
for i = 3, #ARGV, 2 do
  local url, stored_at = ARGV[i], ARGV[i + 1]
  local value = redis.call('HGET', ARGV[1] .. string.sub(redis.sha1hex(url), 1, 3), url)
  if value and string.match(value, '^%S+ (%d+)') == stored_at then
    if recent_add(KEYS[1], ARGV[2], recent_member(stored_at, url)) then added = added + 1 end
  end
end
return added
