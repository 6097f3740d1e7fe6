-- KEYS: stream   ARGV: group from-consumer to-consumer entry-id...
--   ->  {entry-id, {field, value, ...}} for each entry moved
-- A worker takes over entries it saw pending under `from-consumer` (a dead worker, or itself after a lost
-- reply: queue.py claim_unattended), each only if it is still pending under that name now: one that another
-- worker took over since the look stays with that worker, however recently either look was made.
local moved = {}
for i = 4, #ARGV do
  local still = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #still == 1 then
    local taken = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[i])
    if taken[1] then moved[#moved + 1] = taken[1] end
  end
end
return moved
