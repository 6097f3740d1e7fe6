-- The newest-first order (index.py, "recent"). Each URL has one member, "<stored_at ms, 6 bytes big-endian>
-- <SHA-1 of the URL, 20 raw bytes><URL>", with score 0, so Redis orders the members byte by byte: by
-- (stored_at, SHA-1), then URL. They live in leaves, sorted sets of at most RECENT_LEAF members, each
-- holding the members from its lower bound (the first 26 bytes of a member; '' for the first leaf) up to the
-- next leaf's; the directory sorted set lists the bounds. Small leaves keep Redis's compact encoding, about
-- half the bytes of one large sorted set (BENCHMARKS.md, "Listing and memory"). Lua never orders these
-- binary strings itself: its < follows the server's locale (strcoll); Redis's lex ranges are memcmp.
local RECENT_LEAF = 128  -- members a leaf holds before it splits
local RECENT_MERGE = 32  -- a leaf left with fewer members joins the one before, if they fit in one
local RECENT_KEY = 26  -- bytes of a member's (stored_at, SHA-1) key, a bound's length

local function recent_member(stored_at, url)
  local t, h = tonumber(stored_at), redis.sha1hex(url)
  return struct.pack('>I2I4I4I4I4I4I4', math.floor(t / 4294967296), t % 4294967296,
    tonumber(string.sub(h, 1, 8), 16), tonumber(string.sub(h, 9, 16), 16), tonumber(string.sub(h, 17, 24), 16),
    tonumber(string.sub(h, 25, 32), 16), tonumber(string.sub(h, 33, 40), 16)) .. url
end

local function recent_hex(raw)
  return string.format(string.rep('%02x', #raw), string.byte(raw, 1, -1))
end

-- The leaf of a bound: named by the bound's hex, 'first' for ''.
local function recent_leaf(leaves, bound)
  if bound == '' then return leaves .. 'first' end
  return leaves .. recent_hex(bound)
end

-- The bound of the leaf that holds, or would hold, a member (or a 26-byte key).
local function recent_bound(dir, member)
  return redis.call('ZREVRANGEBYLEX', dir, '[' .. member, '-', 'LIMIT', 0, 1)[1]
end

local function recent_move(from, to, members)
  for i = 1, #members, 500 do
    local args = {}
    for j = i, math.min(i + 499, #members) do
      args[#args + 1] = 0
      args[#args + 1] = members[j]
    end
    redis.call('ZADD', to, unpack(args))
  end
  redis.call('ZREM', from, unpack(members))
end

-- Adds a member; true if it was not there.
local function recent_add(dir, leaves, member)
  local bound = recent_bound(dir, member)
  if not bound then
    bound = ''
    redis.call('ZADD', dir, 0, '')
  end
  local leaf = recent_leaf(leaves, bound)
  if redis.call('ZADD', leaf, 0, member) == 0 then return false end
  if redis.call('ZCARD', leaf) <= RECENT_LEAF then return true end
  -- Full. Stores arrive newest last: a member past the leaf's end starts the next leaf, so leaves fill up
  -- rather than stay half full; elsewhere the leaf splits in the middle. Members sharing a key stay together.
  local at = member
  if redis.call('ZREVRANK', leaf, member) ~= 0 then at = redis.call('ZRANGE', leaf, RECENT_LEAF / 2, RECENT_LEAF / 2)[1] end
  local split = string.sub(at, 1, RECENT_KEY)
  if split == bound then return true end  -- over RECENT_LEAF URLs with one (stored_at, SHA-1): it grows
  recent_move(leaf, recent_leaf(leaves, split), redis.call('ZRANGEBYLEX', leaf, '[' .. split, '+'))
  redis.call('ZADD', dir, 0, split)
  return true
end

local function recent_remove(dir, leaves, member)
  local bound = recent_bound(dir, member)
  if not bound then return end
  local leaf = recent_leaf(leaves, bound)
  if redis.call('ZREM', leaf, member) == 0 or bound == '' then return end
  local left = redis.call('ZCARD', leaf)
  if left >= RECENT_MERGE then return end
  local before = recent_leaf(leaves, redis.call('ZREVRANGEBYLEX', dir, '(' .. bound, '-', 'LIMIT', 0, 1)[1] or '')
  if left > 0 then
    if redis.call('ZCARD', before) + left > RECENT_LEAF then return end
    recent_move(leaf, before, redis.call('ZRANGE', leaf, 0, -1))
  end
  redis.call('ZREM', dir, bound)
end
