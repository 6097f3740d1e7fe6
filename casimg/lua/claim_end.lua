-- KEYS: claim     ARGV: token replacement ttl_ms  ->  1 if the claim was still the caller's
-- Ends a claim its holder still has: deletes it, or (replacement not empty) leaves `replacement` in its
-- place for ttl_ms, such as a failed render's error for the requests that waited on it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
