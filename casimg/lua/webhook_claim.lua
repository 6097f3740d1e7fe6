-- KEYS: webhooks     ARGV: now_ms lease_ms count job_prefix token
--   ->  {job_id, attempt, callback, since_ms, total, bytes, ...} for each callback claimed
-- Claims up to `count` due callbacks for one deliverer: each one's due time moves on by the lease, so no
-- other process takes it meanwhile, and one whose deliverer dies is due again when the lease ends. The
-- token, kept in the job, is what lets only the latest claimant record the outcome (webhook_done.lua).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for i = 1, #due do
  local job = ARGV[4] .. due[i]
  local hook = redis.call('HMGET', job, 'cb_state', 'callback', 'cb_since', 'total', 'bytes')
  if hook[1] ~= 'pending' or not hook[2] then
    redis.call('ZREM', KEYS[1], due[i])  -- delivered, failed, or the job expired
  else
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due[i])
    local attempt = redis.call('HINCRBY', job, 'cb_attempts', 1)
    redis.call('HSET', job, 'cb_claim', ARGV[5])
    claimed[#claimed + 1] = due[i]
    claimed[#claimed + 1] = attempt
    claimed[#claimed + 1] = hook[2]
    claimed[#claimed + 1] = hook[3] or ARGV[1]
    claimed[#claimed + 1] = hook[4] or 0
    claimed[#claimed + 1] = hook[5] or 0
  end
end
return claimed
