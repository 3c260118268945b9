-- compliance_recalc_queue, version 1: the compliance recalculation queue with the R-A1
-- columns, one row per enqueue request (a job that coalesced several requests shows once
-- per request, each with the job's status).
CREATE VIEW compliance_recalc_queue AS
SELECT compliance_property_id(j.payload) AS property_id,
       p.client_id,
       r.trigger_reason,
       r.actor_type,
       r.actor_id,
       r.correlation_id,
       j.status,
       j.attempts,
       j.next_run_at,
       j.last_error,
       r.created_at,
       j.updated_at
  FROM outbox_request r
  JOIN outbox_job j ON j.id = r.job_id
  LEFT JOIN properties p ON p.id = compliance_property_id(j.payload)
 WHERE j.task = 'compliance.recalculate_property';
