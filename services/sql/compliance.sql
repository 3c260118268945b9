-- Queries of the compliance services. Mutations lock the property row first, the same lock a
-- recalculation holds while it reads, which is what makes "pending" race-free (G2, docs/guarantees.md).

-- name: insert_client
INSERT INTO clients (name) VALUES (%(name)s) RETURNING id

-- name: insert_property
INSERT INTO properties (client_id, name, has_gas_supply)
VALUES (%(client_id)s, %(name)s, %(has_gas_supply)s)
RETURNING id

-- name: lock_client_for_create
-- Serialises creations for one client, so a replayed creation waits for the first and sees it.
-- NO KEY UPDATE leaves the key-share locks of inserted properties' foreign keys alone.
SELECT 1 FROM clients WHERE id = %(client_id)s FOR NO KEY UPDATE

-- name: property_created_by_request
-- The job of the property this client already created under this correlation id (a replay).
SELECT r.job_id
  FROM properties p
  JOIN outbox_request r ON r.coalescing_key = 'property:' || p.id AND r.correlation_id = %(correlation_id)s
 WHERE p.client_id = %(client_id)s AND r.trigger_reason = 'property_create'
 ORDER BY p.id
 LIMIT 1

-- name: lock_clients_for_provisioning
-- Serialises provisioning (rare, admin-driven), so a replay waits for the first and sees its
-- audit row. Does not conflict with row locks or foreign-key checks on clients.
LOCK TABLE clients IN SHARE ROW EXCLUSIVE MODE

-- name: client_provisioned_by_request
-- The client a provisioning with this correlation id created, and the job of its first property.
SELECT a.client_id,
       (SELECT r.job_id
          FROM properties p
          JOIN outbox_request r ON r.coalescing_key = 'property:' || p.id AND r.correlation_id = a.correlation_id
         WHERE p.client_id = a.client_id
         ORDER BY p.id
         LIMIT 1) AS job_id
  FROM audit_log a
 WHERE a.action = 'CLIENT_PROVISIONED' AND a.correlation_id = %(correlation_id)s
 LIMIT 1

-- name: lock_property
-- Serialises every change of one property with its recalculation.
SELECT id, client_id FROM properties WHERE id = %(property_id)s FOR UPDATE

-- name: request_recalculation
SELECT job_id, created_request, created_job
  FROM compliance_request_recalculation(%(property_id)s, %(correlation_id)s, %(trigger_reason)s,
                                        %(actor_type)s, %(actor_id)s, NULL, %(mark_pending)s)

-- name: insert_document
INSERT INTO documents (property_id, requirement_code, status, expires_at, file_name, size_bytes, sha256, source)
VALUES (%(property_id)s, %(requirement_code)s, %(status)s, %(expires_at)s, %(file_name)s,
        %(size_bytes)s, %(sha256)s, %(source)s)
RETURNING id

-- name: document_property
-- The property of a document, deleted or not: a replayed change must reach the replay check.
SELECT property_id FROM documents WHERE id = %(document_id)s

-- name: live_document
-- A document that is not deleted, with its property.
SELECT id, property_id, requirement_code, status, expires_at, source
  FROM documents
 WHERE id = %(document_id)s AND deleted_at IS NULL

-- name: soft_delete_document
UPDATE documents SET deleted_at = now(), updated_at = now()
 WHERE id = %(document_id)s AND deleted_at IS NULL

-- name: set_document_status
UPDATE documents SET status = %(status)s, rejection_reason = %(rejection_reason)s, updated_at = now()
 WHERE id = %(document_id)s AND deleted_at IS NULL

-- name: apply_ai_fields
UPDATE documents
   SET requirement_code = %(requirement_code)s, expires_at = %(expires_at)s, source = 'ai', updated_at = now()
 WHERE id = %(document_id)s AND deleted_at IS NULL

-- name: insert_audit
INSERT INTO audit_log (action, actor_type, actor_id, property_id, client_id, correlation_id, job_id, details)
VALUES (%(action)s, %(actor_type)s, %(actor_id)s, %(property_id)s, %(client_id)s, %(correlation_id)s,
        %(job_id)s, %(details)s)

-- name: lock_property_for_scoring
-- The recalculation's first read: the lock keeps every mutation of this property out until
-- the new score commits, so the inputs read below are one consistent state.
SELECT id, client_id, has_gas_supply, generation, compliance_score, compliance_breakdown,
       compliance_version, compliance_as_of, compliance_inputs_fingerprint
  FROM properties
 WHERE id = %(property_id)s
   FOR UPDATE

-- name: live_documents_of_property
SELECT id, requirement_code, status, expires_at
  FROM documents
 WHERE property_id = %(property_id)s AND deleted_at IS NULL

-- name: store_score_with_history
-- The new score and its history snapshot in one statement: one round trip, the breakdown sent
-- once. The property row is locked and known to exist, so exactly one snapshot is inserted.
WITH stored AS (
    UPDATE properties
       SET compliance_score = %(score)s,
           compliance_breakdown = %(breakdown)s,
           compliance_version = %(version)s,
           compliance_as_of = %(as_of)s,
           compliance_inputs_fingerprint = %(fingerprint)s,
           compliance_last_calculated_at = now(),
           scored_generation = %(generation)s
     WHERE id = %(property_id)s
    RETURNING id
)
INSERT INTO property_compliance_score_history
       (property_id, job_id, score, breakdown, version, as_of, inputs_fingerprint, generation)
SELECT id, %(job_id)s, %(score)s, %(breakdown)s, %(version)s, %(as_of)s, %(fingerprint)s, %(generation)s
  FROM stored

-- name: property_client
SELECT client_id FROM properties WHERE id = %(property_id)s
