-- KEYS: job results queue queue-owners webhooks     ARGV: entry group field result_json counter owner now_ms now_iso
complete(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[1], ARGV[3], ARGV[4], ARGV[5], KEYS[4], ARGV[6], ARGV[7], KEYS[5])
return 1
