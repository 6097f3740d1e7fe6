-- KEYS: url-bucket-of-url     ARGV: url digest meta  ->  1 if the URL pointed at digest without metadata
-- and has it now
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value or string.sub(value, 1, 64) ~= ARGV[2] or string.find(value, ' ', 67, true) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], value .. ' ' .. ARGV[3])
return 1
