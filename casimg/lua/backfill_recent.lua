-- KEYS: recent     ARGV: url_prefix recent_leaf_prefix first_bucket last_bucket (0..4095)  ->  members added
-- Gives each URL of these buckets its member in the newest-first order (lib_recent.lua), from the stored_at
-- in its value; a URL that has one already is left as it is. migrate.py runs it over every bucket once.
local added = 0
for b = tonumber(ARGV[3]), tonumber(ARGV[4]) do
  local flat = redis.call('HGETALL', ARGV[1] .. bucket_name(b))
  for i = 1, #flat, 2 do
    local stored_at = string.match(flat[i + 1], '^%S+ (%d+)')
    if stored_at then
      if recent_add(KEYS[1], ARGV[2], recent_member(stored_at, flat[i])) then added = added + 1 end
    end
  end
end
return added
