-- Answers of keyed changes (services/idempotent_answers.py).

-- name: stored_answer
SELECT fingerprint, body, created_at
  FROM idempotent_answer
 WHERE scope = %(scope)s AND key = %(key)s

-- name: store_answer
-- In the change's own transaction. A concurrent request under the same key waits here for the
-- first one's commit and then inserts nothing, which rolls its change back.
INSERT INTO idempotent_answer (scope, key, fingerprint, method, path, body)
VALUES (%(scope)s, %(key)s, %(fingerprint)s, %(method)s, %(path)s, %(body)s)
ON CONFLICT (scope, key) DO NOTHING
RETURNING created_at

-- name: prune_answers
-- Oldest first, a batch at a time, so a large backlog never holds one long transaction.
DELETE FROM idempotent_answer
 WHERE ctid = ANY(ARRAY(SELECT ctid FROM idempotent_answer
                         WHERE created_at < now() - %(older_than)s
                         ORDER BY created_at
                         LIMIT %(batch_size)s))
