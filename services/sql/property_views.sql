-- Read models of the client API: a client's properties and their documents. Reads only.
-- Every property query takes the client id too, so another client's property reads exactly
-- like one that does not exist.

-- name: pv_property_of_client
-- One property, only if it is this client's, with the status of its latest recalculation job.
SELECT p.id, p.client_id, p.name, p.has_gas_supply, p.compliance_score, p.compliance_breakdown,
       p.compliance_version, p.compliance_last_calculated_at, p.compliance_score_pending, p.created_at,
       (SELECT j.status::text FROM outbox_job j
         WHERE j.coalescing_key = 'property:' || p.id
         ORDER BY j.id DESC LIMIT 1) AS latest_job_status
  FROM properties p
 WHERE p.id = %(property_id)s AND p.client_id = %(client_id)s

-- name: pv_properties_of_client
-- A page of a client's properties in id order, keyset-paged: ids never change, so a page
-- never repeats or skips a row whatever is created meanwhile.
SELECT p.id, p.client_id, p.name, p.has_gas_supply, p.compliance_score, p.compliance_breakdown,
       p.compliance_version, p.compliance_last_calculated_at, p.compliance_score_pending, p.created_at,
       (SELECT j.status::text FROM outbox_job j
         WHERE j.coalescing_key = 'property:' || p.id
         ORDER BY j.id DESC LIMIT 1) AS latest_job_status
  FROM properties p
 WHERE p.client_id = %(client_id)s AND p.id > %(after_id)s
 ORDER BY p.id
 LIMIT %(limit)s

-- name: pv_live_documents_of_property
SELECT d.id, d.property_id, d.requirement_code::text AS requirement_code, d.status::text AS status,
       d.expires_at, d.file_name, d.size_bytes, d.sha256, d.source::text AS source, d.rejection_reason,
       d.created_at, d.updated_at
  FROM documents d
 WHERE d.property_id = %(property_id)s AND d.deleted_at IS NULL
 ORDER BY d.id

-- name: pv_documents_by_ids
-- Documents of one property by id, deleted ones included: a replayed upload answers with what
-- the first request made, even if some of it was deleted since.
SELECT d.id, d.property_id, d.requirement_code::text AS requirement_code, d.status::text AS status,
       d.expires_at, d.file_name, d.size_bytes, d.sha256, d.source::text AS source, d.rejection_reason,
       d.created_at, d.updated_at
  FROM documents d
 WHERE d.property_id = %(property_id)s AND d.id = ANY(%(document_ids)s)
 ORDER BY d.id

-- name: pv_document_of_property
-- A document of this property; a deleted one only when asked for (a replayed delete).
SELECT d.id, d.property_id, d.requirement_code::text AS requirement_code, d.status::text AS status,
       d.expires_at, d.file_name, d.size_bytes, d.sha256, d.source::text AS source, d.rejection_reason,
       d.created_at, d.updated_at
  FROM documents d
 WHERE d.id = %(document_id)s AND d.property_id = %(property_id)s
   AND (d.deleted_at IS NULL OR %(include_deleted)s)

-- name: pv_documents_uploaded_by_request
-- The document ids an upload with this correlation id added to this property.
SELECT a.details -> 'document_ids' AS document_ids
  FROM audit_log a
 WHERE a.property_id = %(property_id)s AND a.action = 'DOCUMENT_UPLOADED'
   AND a.correlation_id = %(correlation_id)s
 ORDER BY a.id
 LIMIT 1

-- name: pv_property_created_by_request
-- The property this client created under this correlation id (a replayed creation).
SELECT p.id
  FROM properties p
  JOIN outbox_request r ON r.coalescing_key = 'property:' || p.id AND r.correlation_id = %(correlation_id)s
 WHERE p.client_id = %(client_id)s AND r.trigger_reason = 'property_create'
 ORDER BY p.id
 LIMIT 1

-- name: pv_document_changed_by_request
-- Whether a change of this kind (DOCUMENT_DELETED, AI_SUGGESTION_APPLIED) to this document
-- was made under this correlation id: a replay answers for it only if it was.
SELECT 1
  FROM audit_log a
 WHERE a.property_id = %(property_id)s AND a.action = %(action)s
   AND a.correlation_id = %(correlation_id)s AND a.details ->> 'document_id' = %(document_id)s::text
 LIMIT 1
