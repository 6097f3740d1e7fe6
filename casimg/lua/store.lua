-- KEYS: url-bucket-of-url blob-bucket-of-digest count job results queue queue-owners recent webhooks
-- ARGV: url digest meta now_ms entry group field attempts owner recent_leaf_prefix placeholder_todo
--       placeholder_prefix now_iso
-- A URL of a cancelled job is not indexed: the entry leaves the queue, and the caller removes the bytes.
-- The job's result carries what a page lays out before the image arrives: width, height and the content's
-- placeholder (kept once per content, in its placeholder bucket) when it has one. A stored URL whose content
-- has none queues the content in `placeholder_todo` ('' with placeholders off), in this same step, for a
-- filler to make it (filler.py); an entry there already (queued, or claimed under a lease) is left as it is.
local url, digest = ARGV[1], ARGV[2]
if ARGV[7] ~= '' and redis.call('HEXISTS', KEYS[4], 'cancelled') == 1 then
  complete(KEYS[4], KEYS[5], KEYS[6], ARGV[6], ARGV[5], '', '', '', KEYS[7], ARGV[9], ARGV[4], KEYS[9])
  return {'cancelled', digest, -1}
end
local old = redis.call('HGET', KEYS[1], url)
local outcome, prior, width, height
if old then
  outcome, digest, prior = 'exists', string.sub(old, 1, 64), -1
  width, height = string.match(old, '^%S+ %S+ %d+ (%d+) (%d+) ')
else
  prior = redis.call('HINCRBY', KEYS[2], unhex(digest), 1) - 1
  local value = digest .. ' ' .. ARGV[4]
  if ARGV[3] ~= '' then value = value .. ' ' .. ARGV[3] end
  redis.call('HSET', KEYS[1], url, value)
  recent_add(KEYS[8], ARGV[10], recent_member(ARGV[4], url))
  redis.call('HINCRBY', KEYS[3], 'urls', 1)
  if prior == 0 then redis.call('HINCRBY', KEYS[3], 'blobs', 1) end
  outcome = 'stored'
  width, height = string.match(ARGV[3], '^%d+ (%d+) (%d+) ')
end
local placeholder = redis.call('HGET', ARGV[12] .. string.sub(digest, 1, 3), unhex(digest))
if outcome == 'stored' and placeholder == false and ARGV[11] ~= '' then
  redis.call('ZADD', ARGV[11], 'NX', ARGV[4], digest)
end
local result = {status = outcome, sha256 = digest, attempts = tonumber(ARGV[8]), width = tonumber(width),
                height = tonumber(height), placeholder = placeholder ~= '' and placeholder or cjson.null}
if outcome == 'stored' and prior > 0 then result.deduplicated = true end
complete(KEYS[4], KEYS[5], KEYS[6], ARGV[6], ARGV[5], ARGV[7], cjson.encode(result),
         outcome == 'stored' and 'stored' or 'existed', KEYS[7], ARGV[9], ARGV[4], KEYS[9])
return {outcome, digest, prior}
