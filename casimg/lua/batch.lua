-- The driver of a batched script (lua.batched): the script's own file, wrapped as the function `one`, runs
-- once per call. KEYS: each call's keys, one call after the other. ARGV: keys per call, args per call, calls,
-- then each call's args. Returns, per call, {1, its reply} or {0, its error}: one call's error is its own,
-- as it would be in a pipeline (what a failing call wrote stays, as it would alone).
local per_keys, per_args, calls = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local replies = {}
for call = 0, calls - 1 do
  local keys, args = {}, {}
  for i = 1, per_keys do keys[i] = KEYS[call * per_keys + i] end
  for i = 1, per_args do args[i] = ARGV[3 + call * per_args + i] end
  local ok, reply = pcall(one, keys, args)
  if ok then
    replies[call + 1] = {1, reply}
  else
    if type(reply) == 'table' then reply = reply.err end
    replies[call + 1] = {0, tostring(reply)}
  end
end
return replies
