-- Queries of the scheduled maintenance (celery beat): expiry rollover and drift sweep.
-- Both walk properties in id order, one bounded batch per transaction, and ask for
-- recalculations through compliance_request_recalculation, the same contract every other
-- producer uses. Properties are locked in id order, so two runs at once queue up instead of
-- deadlocking, and the correlation id (one per property per day) makes the second a no-op.

-- name: maintenance_expiry_rollover_batch
-- The next batch of properties after %(after_property_id)s; for each whose stored score was
-- computed as of a date D0 (compliance_as_of) from which a live document has since crossed an
-- expiry boundary, a recalculation is requested. The boundaries are services/scoring.py's
-- document_state, between D0 and %(today)s:
--   expired:     valid through D0 (expires_at >= D0) and no longer on today (expires_at < today);
--                a rejected document scores 0 either way;
--   window:      a verified document more than the window away on D0 (expires_at > D0 + window)
--                and within it today (expires_at <= today + window); a pending one scores the
--                same inside or outside the window;
-- and a gas_safety document counts only for a property with a gas supply. Never-scored
-- properties are skipped: their first recalculation is already queued. The window is between
-- D0 and today, not yesterday and today, so a skipped night is caught up.
WITH batch AS (
    SELECT id, has_gas_supply, compliance_as_of
      FROM properties
     WHERE id > %(after_property_id)s
     ORDER BY id
     LIMIT %(limit)s
), crossed AS (
    SELECT b.id
      FROM batch b
     WHERE b.compliance_as_of IS NOT NULL
       AND EXISTS (
           SELECT 1
             FROM documents d
            WHERE d.property_id = b.id
              AND d.deleted_at IS NULL
              AND d.status <> 'rejected'
              AND (b.has_gas_supply OR d.requirement_code <> 'gas_safety')
              AND ((d.expires_at >= b.compliance_as_of AND d.expires_at < %(today)s::date)
                   OR (d.status = 'verified'
                       AND d.expires_at > b.compliance_as_of + %(window_days)s::integer
                       AND d.expires_at <= %(today)s::date + %(window_days)s::integer)))
     ORDER BY b.id
), requested AS (
    SELECT r.created_request
      FROM crossed c
     CROSS JOIN LATERAL compliance_request_recalculation(
               c.id, %(correlation_id)s, %(trigger_reason)s, %(actor_type)s, %(actor_id)s) r
)
SELECT (SELECT count(*) FROM batch) AS scanned,
       (SELECT max(id) FROM batch) AS last_property_id,
       count(*) FILTER (WHERE created_request) AS enqueued,
       count(*) FILTER (WHERE NOT created_request) AS already_requested
  FROM requested

-- name: maintenance_drift_sweep_batch
-- The next batch of properties after %(after_property_id)s; every scored one gets a
-- verification run (mark_pending false: nobody changed it, so no "Updating..."). A property
-- never scored has its first recalculation queued already; there is nothing to verify yet.
WITH batch AS (
    SELECT id, compliance_as_of
      FROM properties
     WHERE id > %(after_property_id)s
     ORDER BY id
     LIMIT %(limit)s
), requested AS (
    SELECT r.created_request
      FROM (SELECT id FROM batch WHERE compliance_as_of IS NOT NULL ORDER BY id) b
     CROSS JOIN LATERAL compliance_request_recalculation(
               b.id, %(correlation_id)s, %(trigger_reason)s, %(actor_type)s, %(actor_id)s, NULL, false) r
)
SELECT (SELECT count(*) FROM batch) AS scanned,
       (SELECT max(id) FROM batch) AS last_property_id,
       count(*) FILTER (WHERE created_request) AS requested
  FROM requested

-- name: maintenance_drift_detected_since
SELECT count(*)
  FROM audit_log
 WHERE action = 'COMPLIANCE_SCORE_DRIFT_DETECTED' AND at >= %(since)s
