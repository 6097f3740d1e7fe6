-- Shared by the store, complete, publish and cancel scripts. finish_job: a job's last step, which also queues
-- its callback, if it has one, in the webhooks set (due at once), so that a callback is never lost between
-- a job's end and its delivery. complete: record one URL's outcome in its job exactly once and remove the
-- queue entry. A job key that has expired, or a cancelled job, still gets its entry acknowledged. The stream's owner (an API key
-- id, '' for the keyless stream) is scored in the owners set with the time its stream became empty, in the
-- step that empties it; the submit script scores it +inf while its stream holds entries.
local function finish_job(job, hooks, now_ms, now_iso)
  redis.call('HSET', job, 'status', 'done', 'finished', now_iso)
  local hook = redis.call('HMGET', job, 'id', 'callback')
  if hook[2] and hook[2] ~= '' then
    redis.call('HSET', job, 'cb_state', 'pending', 'cb_since', now_ms)
    redis.call('ZADD', hooks, now_ms, hook[1])
  end
end
local function complete(job, results, queue, group, entry, field, result, counter, owners, owner, now_ms, hooks)
  if entry ~= '' then
    redis.call('XACK', queue, group, entry)
    redis.call('XDEL', queue, entry)
    if owner ~= '' and redis.call('XLEN', queue) == 0 then redis.call('ZADD', owners, now_ms, owner) end
  end
  if field == '' then return end
  local state = redis.call('HMGET', job, 'total', 'cancelled')  -- no total: the job expired
  if not state[1] or state[2] then return end
  if redis.call('HSETNX', results, field, result) == 0 then return end
  if redis.call('TTL', results) < 0 then redis.call('EXPIRE', results, math.max(redis.call('TTL', job), 1)) end
  redis.call('HINCRBY', job, counter, 1)
  local done = redis.call('HINCRBY', job, 'done', 1)
  if done >= tonumber(state[1]) then
    finish_job(job, hooks, now_ms, ARGV[#ARGV])
  elseif redis.call('HGET', job, 'status') == 'queued' then
    redis.call('HSET', job, 'status', 'running')
  end
end
