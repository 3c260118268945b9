-- compliance_recalc_queue, version 2: version 1's columns, in the same order, plus
--   job_id          the job that carries the request; newer jobs have larger ids, so
--                   `ORDER BY job_id DESC LIMIT n` is "latest first" and is read straight from
--                   ix_outbox_job_compliance_property_id with `WHERE property_id = X`
--                   (ordering by created_at, a request column, sorts every row of the property)
--   coalescing_key  the job's key ('property:<id>'), the key /api/admin/jobs?key= filters on
-- Still one row per enqueue request, unordered: a view's ORDER BY would sort every query.
-- Only appends columns, so CREATE OR REPLACE keeps whatever depends on the view.
CREATE OR REPLACE VIEW compliance_recalc_queue AS
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
       j.updated_at,
       j.id AS job_id,
       j.coalescing_key
  FROM outbox_request r
  JOIN outbox_job j ON j.id = r.job_id
  LEFT JOIN properties p ON p.id = compliance_property_id(j.payload)
 WHERE j.task = 'compliance.recalculate_property';
