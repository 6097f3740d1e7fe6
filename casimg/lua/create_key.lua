-- KEYS: api_keys     ARGV: id record_json name only_if_empty  ->  1 created, 0 name taken, -1 not empty
if ARGV[4] == '1' and redis.call('HLEN', KEYS[1]) > 0 then return -1 end
local all = redis.call('HVALS', KEYS[1])
for i = 1, #all do
  if cjson.decode(all[i]).name == ARGV[3] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
