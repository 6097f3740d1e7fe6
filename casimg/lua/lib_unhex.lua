-- The first 64 hex digits of h -> their 32 raw bytes, a blob record's field. Eight 32-bit words through
-- Redis's bundled struct library: cheaper than 32 single bytes through string.char, and this runs on the
-- lookup path (BENCHMARKS.md, "Figures behind design choices").
local function unhex(h)
  return struct.pack('>I4I4I4I4I4I4I4I4',
    tonumber(string.sub(h, 1, 8), 16),
    tonumber(string.sub(h, 9, 16), 16),
    tonumber(string.sub(h, 17, 24), 16),
    tonumber(string.sub(h, 25, 32), 16),
    tonumber(string.sub(h, 33, 40), 16),
    tonumber(string.sub(h, 41, 48), 16),
    tonumber(string.sub(h, 49, 56), 16),
    tonumber(string.sub(h, 57, 64), 16))
end
