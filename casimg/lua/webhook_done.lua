-- KEYS: job webhooks     ARGV: job_id token state status error next_due_ms
--   ->  1 recorded; 0 the claim was lost (its lease ran out and another process claimed the callback)
-- state: 'delivered' or 'failed' (the callback leaves the set), or 'pending' (due again at next_due_ms).
if redis.call('HGET', KEYS[1], 'cb_claim') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'cb_state', ARGV[3], 'cb_status', ARGV[4], 'cb_error', ARGV[5])
redis.call('HDEL', KEYS[1], 'cb_claim')
if ARGV[3] == 'pending' then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[6]), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
