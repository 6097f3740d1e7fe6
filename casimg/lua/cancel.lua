-- KEYS: job enqueuing webhooks     ARGV: job_id now_ms now_iso
--   ->  1 cancelled now; 0 done already (unchanged); -1 no such job
-- The job is flagged, its URLs without a result count as failed, and it ends 'done' (its callback queued in
-- this same step). Nothing is written per URL: a URL without a result in a cancelled job reads as 'failed:
-- cancelled' (queue.py), no later outcome is recorded (lib_complete), none of its URLs is indexed
-- (store.lua) or queued (enqueue.lua) afterwards. One step of constant cost, whatever the job's size.
local info = redis.call('HMGET', KEYS[1], 'status', 'total', 'failed', 'done')
if not info[1] then return -1 end
if info[1] == 'done' then return 0 end
local left = tonumber(info[2]) - tonumber(info[4])
redis.call('HSET', KEYS[1], 'cancelled', 1, 'done', info[2], 'failed', tonumber(info[3]) + left)
redis.call('ZREM', KEYS[2], ARGV[1])
finish_job(KEYS[1], KEYS[3], ARGV[2], ARGV[3])
return 1
