-- KEYS: job results queue queue-owners webhooks
-- ARGV: entry group field result_json counter owner now_ms described now_iso
-- `described` (a URL indexed already: "<sha256 hex> <placeholder_prefix>", else '') adds the content's
-- placeholder to the result, as the store script's results have it.
local result = ARGV[4]
if ARGV[8] ~= '' then
  local digest, prefix = string.match(ARGV[8], '^(%x+) (.*)$')
  local decoded = cjson.decode(result)
  local placeholder = redis.call('HGET', prefix .. string.sub(digest, 1, 3), unhex(digest))
  decoded.placeholder = placeholder ~= '' and placeholder or cjson.null  -- '': none can be made
  result = cjson.encode(decoded)
end
complete(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[1], ARGV[3], result, ARGV[5], KEYS[4], ARGV[6], ARGV[7], KEYS[5])
return 1
