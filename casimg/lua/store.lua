-- KEYS: url-bucket-of-url blob-bucket-of-digest count job results queue queue-owners
-- ARGV: url digest meta now_ms entry group field attempts owner placeholder placeholder_prefix now_iso
-- The job's result carries what a page lays out before the image arrives: width, height and the
-- content's placeholder (kept once per content, in its placeholder bucket; `placeholder` is the one this
-- download computed, '' if none, and is kept only if the content has none yet).
local url, digest = ARGV[1], ARGV[2]
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
  redis.call('HINCRBY', KEYS[3], 'urls', 1)
  if prior == 0 then redis.call('HINCRBY', KEYS[3], 'blobs', 1) end
  if ARGV[10] ~= '' then redis.call('HSETNX', ARGV[11] .. string.sub(digest, 1, 3), unhex(digest), ARGV[10]) end
  outcome = 'stored'
  width, height = string.match(ARGV[3], '^%d+ (%d+) (%d+) ')
end
local placeholder = redis.call('HGET', ARGV[11] .. string.sub(digest, 1, 3), unhex(digest))
local result = {status = outcome, sha256 = digest, attempts = tonumber(ARGV[8]), width = tonumber(width),
                height = tonumber(height), placeholder = placeholder or cjson.null}
if outcome == 'stored' and prior > 0 then result.deduplicated = true end
complete(KEYS[4], KEYS[5], KEYS[6], ARGV[6], ARGV[5], ARGV[7], cjson.encode(result),
         outcome == 'stored' and 'stored' or 'existed', KEYS[7], ARGV[9], ARGV[4])
return {outcome, digest, prior}
