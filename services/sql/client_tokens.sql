-- Client API tokens. Only the SHA-256 of a token is stored; see services/client_tokens.py.

-- name: insert_token
INSERT INTO client_tokens (client_id, token_sha256, label)
VALUES (%(client_id)s, %(token_sha256)s, %(label)s)
RETURNING id, created_at

-- name: client_of_token
-- A live token's client. The lookup is by the token's hash, so its timing says nothing useful
-- about the secret; the caller still compares the hash in constant time.
SELECT t.id, t.client_id, t.token_sha256
  FROM client_tokens t
 WHERE t.token_sha256 = %(token_sha256)s AND t.revoked_at IS NULL

-- name: revoke_token
UPDATE client_tokens SET revoked_at = now()
 WHERE id = %(token_id)s AND client_id = %(client_id)s AND revoked_at IS NULL
RETURNING id

-- name: tokens_of_client
SELECT id, label, created_at, revoked_at
  FROM client_tokens
 WHERE client_id = %(client_id)s
 ORDER BY id

-- name: client_exists
SELECT 1 FROM clients WHERE id = %(client_id)s

-- name: client_has_live_token
-- A stream token stays good only while its owner can still sign in: revoking every token of a
-- client ends its streams' tokens too.
SELECT EXISTS (SELECT 1 FROM client_tokens WHERE client_id = %(client_id)s AND revoked_at IS NULL) AS live

-- name: token_is_live
-- A web session signed in with this token lasts only while the token does.
SELECT 1 FROM client_tokens WHERE id = %(token_id)s AND client_id = %(client_id)s AND revoked_at IS NULL
