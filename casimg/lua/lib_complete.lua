-- Shared by the store and complete scripts: record one URL's outcome in its job exactly once and
-- remove the queue entry. A job key that has expired still gets its entry acknowledged. The stream's owner
-- (an API key id, '' for the keyless stream) is scored in the owners set with the time its stream became
-- empty, in the step that empties it; the submit script scores it +inf while its stream holds entries.
local function complete(job, results, queue, group, entry, field, result, counter, owners, owner, now_ms)
  if entry ~= '' then
    redis.call('XACK', queue, group, entry)
    redis.call('XDEL', queue, entry)
    if owner ~= '' and redis.call('XLEN', queue) == 0 then redis.call('ZADD', owners, now_ms, owner) end
  end
  if field == '' or redis.call('EXISTS', job) == 0 then return end
  if redis.call('HSETNX', results, field, result) == 0 then return end
  if redis.call('TTL', results) < 0 then redis.call('EXPIRE', results, math.max(redis.call('TTL', job), 1)) end
  redis.call('HINCRBY', job, counter, 1)
  local done = redis.call('HINCRBY', job, 'done', 1)
  if done >= tonumber(redis.call('HGET', job, 'total')) then
    redis.call('HSET', job, 'status', 'done', 'finished', ARGV[#ARGV])
  elseif redis.call('HGET', job, 'status') == 'queued' then
    redis.call('HSET', job, 'status', 'running')
  end
end
