-- The keys that sign stream tokens (api/stream_tokens.py; table api_signing_key, migration 0018).

-- name: verifying_keys
-- Every key that still verifies, newest first, with whether it is active (signs).
SELECT kid, secret, retired_at IS NULL AS active
  FROM api_signing_key
 WHERE retired_at IS NULL OR retired_at > now()
 ORDER BY created_at DESC, kid

-- name: lock_signing_keys
-- Serialises rotations, and the first start of several processes at once.
SELECT pg_advisory_xact_lock(hashtextextended('recalq.api_signing_key', 0))

-- name: fresh_signing_key
-- A key made within the last second: a concurrent rotation just made it; use that one.
SELECT kid FROM api_signing_key WHERE retired_at IS NULL AND created_at > now() - interval '1 second'

-- name: retire_signing_keys
-- The active keys keep verifying for a token's lifetime, then stop.
UPDATE api_signing_key SET retired_at = now() + make_interval(secs => %(grace_s)s) WHERE retired_at IS NULL

-- name: insert_signing_key
INSERT INTO api_signing_key (kid, secret) VALUES (%(kid)s, %(secret)s)
