-- Read models of the admin API: score history, recalculation status, the queue, jobs, and
-- what an earlier request with the same correlation id did (the answer to its replay).
-- Apart from the two locks at the end, reads only.

-- name: admin_property_current
-- A property's stored score with the status of its latest recalculation job.
SELECT p.id, p.compliance_score, p.compliance_breakdown, p.compliance_version,
       p.compliance_last_calculated_at, p.compliance_score_pending,
       (SELECT j.status::text FROM outbox_job j
         WHERE j.coalescing_key = 'property:' || p.id
         ORDER BY j.id DESC LIMIT 1) AS latest_job_status
  FROM properties p
 WHERE p.id = %(property_id)s

-- name: admin_score_history
-- A property's snapshots, newest first.
SELECT h.job_id, h.score, h.breakdown, h.version, h.as_of, h.calculated_at
  FROM property_compliance_score_history h
 WHERE h.property_id = %(property_id)s
 ORDER BY h.id DESC
 LIMIT %(limit)s

-- name: admin_jobs_of_key
-- The latest jobs of one coalescing key, newest first (ix_outbox_job_key_id).
SELECT j.id AS job_id, j.status::text AS status, j.attempts, j.max_attempts, j.last_error, j.next_run_at,
       j.created_at, j.published_at, j.started_at, j.finished_at, j.celery_task_id::text AS celery_task_id
  FROM outbox_job j
 WHERE j.coalescing_key = %(coalescing_key)s
 ORDER BY j.id DESC
 LIMIT %(limit)s

-- name: admin_requests_of_jobs
-- Who asked for each of these jobs, oldest first, at most %(per_job)s per job (a hot key may
-- coalesce thousands), with each job's total so a reader knows when the list is cut short.
SELECT job_id, trigger_reason, actor_type, actor_id, correlation_id, created_at, total
  FROM (SELECT r.job_id, r.trigger_reason, r.actor_type, r.actor_id, r.correlation_id, r.created_at,
               row_number() OVER (PARTITION BY r.job_id ORDER BY r.id) AS n,
               count(*) OVER (PARTITION BY r.job_id) AS total
          FROM outbox_request r
         WHERE r.job_id = ANY(%(job_ids)s)) ranked
 WHERE n <= %(per_job)s
 ORDER BY job_id, n

-- name: admin_queue_state
SELECT task, status::text AS status, jobs, oldest_age_s::float8 AS oldest_age_s,
       relay_lag_s::float8 AS relay_lag_s, finished_last_1m, finished_last_5m,
       per_second_5m::float8 AS per_second_5m
  FROM outbox_queue_state
 ORDER BY task, status

-- name: admin_jobs
-- A page of jobs, newest first, keyset-paged by id; every filter is optional.
SELECT j.id AS job_id, j.task, j.coalescing_key, j.status::text AS status, j.attempts, j.max_attempts,
       j.last_error, j.next_run_at, j.created_at, j.updated_at, j.published_at, j.started_at, j.finished_at,
       j.celery_task_id::text AS celery_task_id, j.requeue_count
  FROM outbox_job j
 WHERE (%(status)s::outbox_job_status IS NULL OR j.status = %(status)s::outbox_job_status)
   AND (%(coalescing_key)s::text IS NULL OR j.coalescing_key = %(coalescing_key)s::text)
   AND (%(task)s::text IS NULL OR j.task = %(task)s::text)
   AND (%(before_id)s::bigint IS NULL OR j.id < %(before_id)s::bigint)
 ORDER BY j.id DESC
 LIMIT %(limit)s

-- name: admin_job
SELECT j.id AS job_id, j.task, j.coalescing_key, j.status::text AS status, j.attempts, j.max_attempts,
       j.last_error, j.next_run_at, j.created_at, j.updated_at, j.published_at, j.started_at, j.finished_at,
       j.celery_task_id::text AS celery_task_id, j.requeue_count
  FROM outbox_job j
 WHERE j.id = %(job_id)s

-- name: admin_job_status
SELECT status::text AS status FROM outbox_job WHERE id = %(job_id)s

-- name: admin_token
SELECT id AS token_id, label, created_at, revoked_at
  FROM client_tokens
 WHERE id = %(token_id)s AND client_id = %(client_id)s

-- name: admin_lock_client
-- Serialises the token changes of one client, so a replay waits for the first and sees its
-- audit row. NO KEY UPDATE leaves foreign-key checks of new tokens and properties alone.
SELECT 1 FROM clients WHERE id = %(client_id)s FOR NO KEY UPDATE

-- name: admin_documents_awaiting_verification
-- Live documents nobody has verified or rejected yet, oldest first, with whose they are.
SELECT d.id, d.property_id, p.name AS property_name, c.id AS client_id, c.name AS client_name,
       d.requirement_code::text AS requirement_code, d.expires_at, d.file_name, d.size_bytes, d.created_at
  FROM documents d
  JOIN properties p ON p.id = d.property_id
  JOIN clients c ON c.id = p.client_id
 WHERE d.status = 'pending_verification' AND d.deleted_at IS NULL
 ORDER BY d.id
 LIMIT %(limit)s

-- name: admin_cancellable_tasks
-- The kinds whose jobs an admin may cancel (a recalculation may not).
SELECT name FROM outbox_task WHERE cancellable

-- name: admin_lock_job
-- Serialises requeues of one job, so a replay waits for the first and sees its audit row.
SELECT status::text AS status FROM outbox_job WHERE id = %(job_id)s FOR UPDATE
