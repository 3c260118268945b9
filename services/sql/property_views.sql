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
