-- Queries that keep stored document files and documents rows in step (services/uploads.py) and
-- read a document's file for the extractor (services/ai_suggestions.py).

-- name: lock_document_file
-- Held from before a file is written until its rows commit, and by the clean-up that removes
-- files no row references: the clean-up waits for a writer, so it sees the writer's rows.
-- The prefix keeps these keys apart from any other advisory lock in the database.
SELECT pg_advisory_xact_lock(hashtextextended('recalq.document_file:' || %(sha256)s, 0))

-- name: try_lock_document_file
-- The orphan sweep's lock: it skips a file an upload is storing right now instead of waiting.
SELECT pg_try_advisory_xact_lock(hashtextextended('recalq.document_file:' || %(sha256)s, 0))

-- name: referenced_document_files
-- Which of these hashes a documents row references, deleted or not (a soft-deleted document
-- keeps its file).
SELECT DISTINCT sha256 FROM documents WHERE sha256 = ANY(%(sha256s)s::text[])

-- name: live_document_file
-- A live document's fields the extractor reads and the file it is stored as.
SELECT id, property_id, requirement_code, expires_at, file_name, sha256
  FROM documents
 WHERE id = %(document_id)s AND deleted_at IS NULL

-- name: lock_live_document_fields
-- The document's current fields, read under its property's lock (the lock every mutation of
-- the property takes first), so a suggestion keeps exactly what is there when it applies.
SELECT d.requirement_code, d.expires_at
  FROM documents d
  JOIN properties p ON p.id = d.property_id
 WHERE d.id = %(document_id)s AND d.deleted_at IS NULL
   FOR UPDATE OF p

-- name: cached_suggestion
SELECT suggestion FROM document_suggestion WHERE sha256 = %(sha256)s AND extractor_version = %(version)s

-- name: cache_suggestion
-- Two first readers of one file compute the same answer; the second insert is a no-op.
INSERT INTO document_suggestion (sha256, extractor_version, suggestion)
VALUES (%(sha256)s, %(version)s, %(suggestion)s)
ON CONFLICT (sha256, extractor_version) DO NOTHING

-- name: forget_file_suggestions
-- The orphan sweep removed the file: what was read in it goes too.
DELETE FROM document_suggestion WHERE sha256 = %(sha256)s
