-- KEYS: placeholder-todo placeholders-made     ARGV: digest placeholder blob_prefix placeholder_prefix
-- A digest's turn in the queue ends: its placeholder is kept if the content is still referenced and has
-- none yet ('' records that none can be made, an image whose pixels do not decode, so that fsck does not
-- queue it again; listings show it as null). A content deleted meanwhile gets none, and its entry goes all
-- the same. Returns 1 if the placeholder was kept.
redis.call('ZREM', KEYS[1], ARGV[1])
local raw = unhex(ARGV[1])
if not redis.call('HGET', ARGV[3] .. string.sub(ARGV[1], 1, 3), raw) then return 0 end
local kept = redis.call('HSETNX', ARGV[4] .. string.sub(ARGV[1], 1, 3), raw, ARGV[2])
if kept == 1 and ARGV[2] ~= '' then redis.call('SET', KEYS[2], '1') end
return kept
