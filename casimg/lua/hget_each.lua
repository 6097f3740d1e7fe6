-- KEYS: one hash per field     ARGV: the fields  ->  HGET of each field in its hash, in order (nil where
-- missing). One command for what a pipeline of HGETs asks: the client packs and parses one.
local values = {}
for i = 1, #KEYS do values[i] = redis.call('HGET', KEYS[i], ARGV[i]) end
return values
