-- KEYS: url-bucket-of-url     ARGV: url digest meta  ->  1 if the URL pointed at digest with other metadata
-- (or none) and has `meta` now, its stored_at kept: fsck's correction of a record written wrong
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value or string.sub(value, 1, 64) ~= ARGV[2] then return 0 end
local head = string.match(value, '^%S+ %S+')
if not head or value == head .. ' ' .. ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], head .. ' ' .. ARGV[3])
return 1
