-- KEYS: job results enqueuing webhooks     ARGV: job_id result_json now_ms now_iso
--   ->  1 cancelled now; 0 done already (unchanged); -1 no such job
-- Every URL without a result fails with result_json, the job ends 'done' (its callback queued in this same
-- step), and the job is flagged so that no worker indexes a URL of it afterwards (store.lua) nor starts one.
local info = redis.call('HMGET', KEYS[1], 'status', 'total', 'failed', 'done')
if not info[1] then return -1 end
if info[1] == 'done' then return 0 end
local total, added = tonumber(info[2]), 0
for pos = 0, total - 1 do
  added = added + redis.call('HSETNX', KEYS[2], pos, ARGV[2])
end
redis.call('HSET', KEYS[1], 'cancelled', 1, 'done', tonumber(info[4]) + added, 'failed', tonumber(info[3]) + added)
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], math.max(redis.call('TTL', KEYS[1]), 1)) end
redis.call('ZREM', KEYS[3], ARGV[1])
finish_job(KEYS[1], KEYS[4], ARGV[3], ARGV[4])
return 1
