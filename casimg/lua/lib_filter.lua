-- The listing's filters (index.ListingFilter): a URL matches when it starts with `prefix`, holds `contains`
-- and has the host `host` (lowercase, without the port, an IPv6 address without its brackets, as Python's
-- urlsplit().hostname gives it), each '' for no condition. Plain byte comparisons:
-- no patterns, and string.lower lowers ASCII only (Redis runs Lua in the C locale for character types).
local function url_host(url)
  local rest = string.match(url, '^[%a][%w+.-]*://(.*)$')
  if not rest then return nil end
  local authority = string.gsub(string.match(rest, '^[^/?#]*'), '^.*@', '')
  local bracketed = string.match(authority, '^%[([^%]]*)%]')
  if bracketed then return string.lower(bracketed) end
  return string.lower((string.gsub(authority, ':%d*$', '')))
end

local function url_matches(url, prefix, contains, host)
  if prefix ~= '' and string.sub(url, 1, #prefix) ~= prefix then return false end
  if contains ~= '' and not string.find(url, contains, 1, true) then return false end
  if host ~= '' and url_host(url) ~= host then return false end
  return true
end

-- Microseconds by the server's clock: a filtered page stops looking once it has held Redis long enough.
-- (TIME makes a script non-deterministic, which Redis allows in the page scripts as they write nothing.)
local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
