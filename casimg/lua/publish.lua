-- KEYS: job urls results inflight enqueuing webhooks
-- ARGV: job_id ttl_ms created key_id max_in_flight job_prefix now_ms total failed bytes max_bytes callback
--   traceparent
--   ->  {1, 0} published; {0, jobs} too many unfinished jobs; {2, bytes held} over the bytes; {-1, 0} the
--       staged list is not whole (it expired)
-- The in-flight set is cleaned as it is read: a job that is done or has expired no longer counts.
local job_id, ttl = ARGV[1], tonumber(ARGV[2])
local limit, total, failed = tonumber(ARGV[5]), tonumber(ARGV[8]), tonumber(ARGV[9])
local bytes, max_bytes = tonumber(ARGV[10]), tonumber(ARGV[11])
if redis.call('LLEN', KEYS[2]) ~= total then return {-1, 0} end
local open = failed < total
if ARGV[4] ~= '' and open then
  local ids, held = redis.call('ZRANGE', KEYS[4], 0, -1), 0
  for i = 1, #ids do
    local info = redis.call('HMGET', ARGV[6] .. ids[i], 'status', 'bytes')
    if not info[1] or info[1] == 'done' then
      redis.call('ZREM', KEYS[4], ids[i])
    else
      held = held + (tonumber(info[2]) or 0)
    end
  end
  local jobs = redis.call('ZCARD', KEYS[4])
  if limit > 0 and jobs >= limit then return {0, jobs} end
  if max_bytes > 0 and held + bytes > max_bytes then return {2, held} end
  redis.call('ZADD', KEYS[4], ARGV[7], job_id)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
redis.call('HSET', KEYS[1], 'status', open and 'queued' or 'done', 'total', total, 'done', failed, 'stored', 0,
           'existed', 0, 'failed', failed, 'created', ARGV[3], 'key', ARGV[4], 'bytes', bytes, 'enqueued', 0)
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[1], 'id', job_id, 'callback', ARGV[12], 'cb_state', 'pending', 'cb_attempts', 0)
end
if not open then finish_job(KEYS[1], KEYS[6], ARGV[7], ARGV[3]) end
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'tp', ARGV[13]) end  -- the submit's trace context
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if open then redis.call('ZADD', KEYS[5], ARGV[7], job_id) end
return {1, 0}
