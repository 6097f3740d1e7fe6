-- KEYS: job urls results queue enqueuing queue_owners queue_wake
-- ARGV: job_id max_urls max_bytes key_queue_prefix group wake_kept  ->  1 all enqueued, 0 more to do
-- An entry carries the submit's trace context ('tp') when the job has one (tracing.py).
-- The next URLs after the job's cursor get their entries, up to max_bytes of them (one at least), and the
-- cursor moves past them in the same step. A position with a result already (a too long URL) gets none.
-- The entries go to the stream of the key that submitted the job (its name built from the prefix, as
-- KeySpace.key_queue does), made with its consumer group by its first entry; the key is marked busy.
-- A key that was not busy gets an entry in queue_wake too: workers read that stream with their entries
-- (idle ones block on it), and know nothing yet of a key they have not seen (queue.py, read_waking).
local job_id = ARGV[1]
local info = redis.call('HMGET', KEYS[1], 'enqueued', 'total', 'key', 'tp', 'cancelled')
local cursor, total, owner, tp = tonumber(info[1]), tonumber(info[2]), info[3] or '', info[4]
if info[5] then total = cursor end  -- cancelled: nothing more to queue
local queue = KEYS[4]
if owner ~= '' then
  queue = ARGV[4] .. owner
  if redis.call('EXISTS', queue) == 0 then redis.call('XGROUP', 'CREATE', queue, ARGV[5], '0', 'MKSTREAM') end
end
if not cursor or not total or cursor >= total then
  redis.call('ZREM', KEYS[5], job_id)
  return 1
end
local urls = redis.call('LRANGE', KEYS[2], cursor, cursor + tonumber(ARGV[2]) - 1)
local budget, taken, added = tonumber(ARGV[3]), 0, 0
for i = 1, #urls do
  if taken > 0 and budget <= 0 then break end
  local pos = cursor + i - 1
  if redis.call('HEXISTS', KEYS[3], pos) == 0 then
    if tp then
      redis.call('XADD', queue, '*', 'job', job_id, 'pos', pos, 'url', urls[i], 'tp', tp)
    else
      redis.call('XADD', queue, '*', 'job', job_id, 'pos', pos, 'url', urls[i])
    end
    added = added + 1
  end
  budget, taken = budget - #urls[i], taken + 1
end
if added > 0 and owner ~= '' then
  if redis.call('ZSCORE', KEYS[6], owner) ~= 'inf' then
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[6], '*', 'key', owner)
  end
  redis.call('ZADD', KEYS[6], 'inf', owner)
end
cursor = cursor + taken
redis.call('HSET', KEYS[1], 'enqueued', cursor)
if cursor >= total or taken == 0 then
  redis.call('ZREM', KEYS[5], job_id)
  return 1
end
return 0
