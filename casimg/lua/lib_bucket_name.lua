-- Bucket number 0..4095 -> its 3 hex digits, for the repair's walk and the buckets it moves URLs to.
local function bucket_name(n)
  return HEX[math.floor(n / 256) + 1] .. HEX[math.floor(n / 16) % 16 + 1] .. HEX[n % 16 + 1]
end
