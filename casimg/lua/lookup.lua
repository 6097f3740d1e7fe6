-- KEYS: url-bucket-of-url     ARGV: url  ->  the URL's value or nil. A plain HGET, as a script so that the
-- ScriptBatcher sends it in one pipeline with the other lookups of its loop turn.
return redis.call('HGET', KEYS[1], ARGV[1])
