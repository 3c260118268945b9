-- Queries the outbox runs from Python. The job lifecycle itself lives in SQL functions
-- (migrations/functions/outbox_v1.sql) so that producers and workers in any language share it.

-- name: enqueue_request
-- The producer contract; see docs/producer-contract.md. Defined in
-- migrations/functions/outbox_v5.sql (the task's coalescing mode decides whether a request joins
-- the key's waiting job, is refused by the key's active job or cooldown, or creates a job).
SELECT job_id, request_id, created_request, created_job, refusal,
       extract(epoch FROM retry_after)::float8 AS retry_after_s
  FROM outbox_enqueue_request(%(task)s, %(coalescing_key)s, %(payload)s, %(correlation_id)s,
                              %(trigger_reason)s, %(actor_type)s, %(actor_id)s, %(max_attempts)s)

-- name: claim_due_jobs
-- The relay claims due pending jobs for a short lease, with the queue and time limits their
-- task's policy gives each message. SKIP LOCKED lets relays run side by
-- side; the lease (not the row lock) keeps a claimed row from being claimed twice while it is
-- published, and lets another relay pick it up if this one dies. Never pages by id: a row
-- that commits late is simply claimed by a later pass.
UPDATE outbox_job j
   SET claimed_until = now() + make_interval(secs => %(lease_seconds)s)
  FROM (SELECT id
          FROM outbox_job
         WHERE status = 'pending'
           AND next_run_at <= now()
           AND (claimed_until IS NULL OR claimed_until < now())
         ORDER BY next_run_at
         LIMIT %(limit)s
           FOR UPDATE SKIP LOCKED) due, outbox_task t
 WHERE j.id = due.id AND t.name = j.task
RETURNING j.id, j.task, j.payload, j.celery_task_id, t.queue, t.time_limit_seconds, t.soft_time_limit_seconds

-- name: seconds_until_next_due
-- Seconds until the earliest pending job that is not due yet falls due (NULL: none), so the
-- relay wakes for it instead of sleeping a whole poll past it: a job held back by its task's
-- min_interval (outbox_v3.sql) notifies when it is created, before it is due. One entry of
-- ix_outbox_job_status_next_run_at.
SELECT extract(epoch FROM min(next_run_at) - now())::float8 AS seconds
  FROM outbox_job
 WHERE status = 'pending' AND next_run_at > now()

-- name: mark_published
-- After the broker confirmed them. Every confirmed publication counts, even of a job a worker
-- started (or finished) before this mark: the message did reach the broker. Only a pending job
-- changes its status; a started one keeps its state and its updated_at.
UPDATE outbox_job
   SET status = CASE WHEN status = 'pending' THEN 'published'::outbox_job_status ELSE status END,
       published_at = CASE WHEN status = 'pending' THEN now() ELSE coalesce(published_at, now()) END,
       updated_at = CASE WHEN status = 'pending' THEN now() ELSE updated_at END,
       publish_count = publish_count + 1, claimed_until = NULL
 WHERE id = ANY(%(ids)s)

-- name: release_claims
-- Rows the broker refused (due or rescued) go back to the relays at once instead of waiting
-- out the lease. claimed_until means nothing outside a claim, so no status guard is needed.
UPDATE outbox_job SET claimed_until = NULL WHERE id = ANY(%(ids)s)

-- name: claim_lost_jobs
-- Jobs whose message looks lost, claimed for re-sending under the same short lease as a
-- normal claim: published but not started, or retrying, for longer than the grace period;
-- running with an expired lease (its worker died and the broker did not redeliver). Status is
-- not changed: the worker's fenced start decides what the new delivery may do, so re-sending
-- a job that was not lost after all is a harmless duplicate. rescued_at throttles re-sending
-- to once per grace period.
-- A running job is taken over only takeover_grace after its lease ran out: a worker that lost
-- the database mid-run resumes the same attempt by its own retry within that time, and a
-- re-send arriving first would count a new attempt, so an outage would burn attempts.
UPDATE outbox_job j
   SET claimed_until = now() + make_interval(secs => %(lease_seconds)s)
  FROM (SELECT id
          FROM outbox_job
         WHERE ((status = 'published' AND published_at < now() - make_interval(secs => %(grace_seconds)s))
             OR (status = 'retrying' AND next_run_at < now() - make_interval(secs => %(grace_seconds)s))
             OR (status = 'running' AND lease_expires_at < now() - make_interval(secs => %(takeover_grace_seconds)s)))
           AND (rescued_at IS NULL OR rescued_at < now() - make_interval(secs => %(grace_seconds)s))
           AND (claimed_until IS NULL OR claimed_until < now())
         ORDER BY id
         LIMIT %(limit)s
           FOR UPDATE SKIP LOCKED) lost, outbox_task t
 WHERE j.id = lost.id AND t.name = j.task
RETURNING j.id, j.task, j.payload, j.celery_task_id, t.queue, t.time_limit_seconds, t.soft_time_limit_seconds

-- name: mark_rescued
-- After the broker confirmed the re-sent messages.
UPDATE outbox_job
   SET rescued_at = now(), rescue_count = rescue_count + 1, publish_count = publish_count + 1,
       claimed_until = NULL
 WHERE id = ANY(%(ids)s)

-- name: start_job
-- A NULL lease_seconds takes the task's lease (outbox_task.lease_seconds).
SELECT outcome, attempt, payload, coalescing_key, extract(epoch FROM retry_after)::float8 AS retry_after_s,
       extract(epoch FROM lease)::float8 AS lease_s
  FROM outbox_start(%(job_id)s, %(redelivered)s, make_interval(secs => %(lease_seconds)s::float8),
                    %(resume_attempt)s, %(worker)s)

-- name: heartbeat_job
SELECT outbox_heartbeat(%(job_id)s, %(attempt)s) AS alive

-- name: complete_job
SELECT outbox_complete(%(job_id)s, %(attempt)s) AS completed

-- name: complete_job_with_result
SELECT outbox_complete(%(job_id)s, %(attempt)s, %(result)s::jsonb) AS completed

-- name: finish_cancelled_job
SELECT outbox_finish_cancelled(%(job_id)s, %(attempt)s) AS cancelled

-- name: fail_job
SELECT outbox_fail(%(job_id)s, %(attempt)s, %(error)s, %(retryable)s,
                   make_interval(secs => %(retry_in_seconds)s)) AS outcome

-- name: requeue_job
SELECT outbox_requeue(%(job_id)s) AS job_id

-- name: requests_of_job
-- Who asked for a job, oldest first (bounded: a hot key may coalesce thousands).
SELECT correlation_id, trigger_reason, actor_type, actor_id, created_at
  FROM outbox_request
 WHERE job_id = %(job_id)s
 ORDER BY id
 LIMIT %(limit)s

-- name: jobs_for_key
-- The latest jobs of one coalescing key, newest first.
SELECT id, task, status, attempts, max_attempts, next_run_at, last_error, created_at, updated_at,
       published_at, started_at, finished_at, celery_task_id
  FROM outbox_job
 WHERE coalescing_key = %(coalescing_key)s
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: queue_state
SELECT task, status, jobs, oldest_age_s, relay_lag_s, finished_last_1m, finished_last_5m, per_second_5m
  FROM outbox_queue_state
 ORDER BY task, status

-- name: find_request
-- An accepted request by its idempotency key, if any.
SELECT id AS request_id, job_id
  FROM outbox_request
 WHERE coalescing_key = %(coalescing_key)s AND correlation_id = %(correlation_id)s

-- name: prune_finished_jobs
-- One batch of retention: done, superseded and cancelled jobs that finished before the cutoff,
-- with their requests (and, by ON DELETE CASCADE, their attempts, events, progress and
-- checkpoints); a watched job leaves a tombstone. DEAD jobs are never pruned (they wait
-- for a requeue or an explicit purge). A job that a superseded job still names is kept until that one is pruned (the foreign key), so a
-- chain goes over several batches; the caller loops until a batch deletes nothing. SKIP
-- LOCKED: pruning never waits on, nor holds up, live work. Deleting a request ends its
-- correlation id's protection against repeats, which is what the retention period means.
-- A task's own retention (outbox_task.retention) replaces the default for its jobs; the
-- shortest of them bounds the range read of ix_outbox_job_finished_at (an InitPlan, computed once).
WITH batch AS (
    SELECT j.id, j.watched, j.task, j.owner, j.finished_at, t.tombstone_retention
      FROM outbox_job j
      JOIN outbox_task t ON t.name = j.task
     WHERE j.status IN ('done', 'superseded', 'cancelled')
       AND j.finished_at < now() - (SELECT min(coalesce(retention, make_interval(secs => %(older_than_seconds)s)))
                                      FROM outbox_task)
       AND j.finished_at < now() - coalesce(t.retention, make_interval(secs => %(older_than_seconds)s))
       AND NOT EXISTS (SELECT 1 FROM outbox_job s WHERE s.superseded_by = j.id)
     ORDER BY j.finished_at
     LIMIT %(limit)s
       FOR UPDATE OF j SKIP LOCKED
), tombstones AS (
    -- A watched job's owner is told "expired", not "unknown", for the task's tombstone_retention.
    INSERT INTO outbox_tombstone (job_id, task, owner, reason, finished_at, keep_until)
    SELECT id, task, owner, 'expired', finished_at, now() + tombstone_retention FROM batch WHERE watched
    ON CONFLICT (job_id) DO NOTHING
), requests AS (
    DELETE FROM outbox_request r USING batch WHERE r.job_id = batch.id RETURNING r.id
), jobs AS (
    DELETE FROM outbox_job j USING batch WHERE j.id = batch.id RETURNING j.id
)
SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM requests) AS requests

-- name: purge_dead_jobs
-- One batch of an explicit purge of DEAD jobs chosen by ids, key or age (a NULL selector
-- matches everything), with the superseded jobs that name them (their requests were carried
-- by the dead job) and all their requests. FOR UPDATE, re-checked after a wait: a job requeued
-- meanwhile is no longer DEAD and is left alone.
WITH RECURSIVE target AS (
    SELECT id
      FROM outbox_job
     WHERE status = 'dead'
       AND (%(job_ids)s::bigint[] IS NULL OR id = ANY(%(job_ids)s::bigint[]))
       AND (%(coalescing_key)s::text IS NULL OR coalescing_key = %(coalescing_key)s::text)
       AND (%(finished_before)s::timestamptz IS NULL OR finished_at < %(finished_before)s::timestamptz)
     ORDER BY id
     LIMIT %(limit)s
       FOR UPDATE
), doomed AS (
    SELECT id FROM target
    UNION
    SELECT s.id FROM outbox_job s JOIN doomed d ON s.superseded_by = d.id
), requests AS (
    DELETE FROM outbox_request r USING doomed WHERE r.job_id = doomed.id RETURNING r.id
), jobs AS (
    DELETE FROM outbox_job j USING doomed WHERE j.id = doomed.id RETURNING j.id
)
SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM requests) AS requests

-- name: job_by_celery_task_id
-- The job a broker message belongs to: every publication of a job carries its fixed task id.
SELECT id AS job_id FROM outbox_job WHERE celery_task_id = %(celery_task_id)s

-- name: fence_attempt
-- The attempt still holds its job (not taken over or superseded); locks it until commit, so no
-- takeover can start while the attempt's effects commit.
SELECT 1 FROM outbox_job
 WHERE id = %(job_id)s AND status = 'running' AND attempts = %(attempt)s
   FOR UPDATE

-- name: attempts_of_job
-- Every attempt of one job, every run (a requeue starts run n+1), oldest first: the finished ones
-- from outbox_attempt, and the one running now from the job's row (no outcome yet).
SELECT * FROM (
    SELECT a.job_id, a.run, a.attempt, a.outcome::text AS outcome, a.error, a.worker,
           a.celery_task_id::text AS celery_task_id, a.started_at, a.finished_at
      FROM outbox_attempt a
     WHERE a.job_id = %(job_id)s
    UNION ALL
    SELECT j.id, j.requeue_count, j.attempts, NULL, NULL, j.worker, j.celery_task_id::text, j.started_at, NULL
      FROM outbox_job j
     WHERE j.id = %(job_id)s AND j.status = 'running'
) attempts
 ORDER BY run, attempt
 LIMIT %(limit)s

-- name: failed_attempts_since
-- Attempts that failed or were lost in the window, per task and outcome (ix_outbox_attempt_failed_at).
SELECT j.task, a.outcome::text AS outcome, count(*) AS attempts
  FROM outbox_attempt a
  JOIN outbox_job j ON j.id = a.job_id
 WHERE a.outcome IN ('failed', 'lost') AND a.finished_at > now() - make_interval(secs => %(seconds)s)
 GROUP BY j.task, a.outcome
 ORDER BY j.task, a.outcome

-- name: watch_job
SELECT outbox_watch(%(job_id)s, %(owner)s) AS seq

-- name: report_progress
SELECT outbox_report_progress(%(job_id)s, %(attempt)s, %(stage)s, %(fraction)s, %(message)s, %(current)s,
                              %(total)s, make_interval(secs => %(min_interval_s)s)) AS written

-- name: cancel_job
SELECT outbox_cancel(%(job_id)s) AS outcome

-- name: fence_unit
-- A unit of a watched job: the attempt still holds the job (locked until commit, like
-- fence_attempt) and whether its cancel has been requested.
SELECT cancel_requested_at IS NOT NULL AS cancel_requested FROM outbox_job
 WHERE id = %(job_id)s AND status = 'running' AND attempts = %(attempt)s
   FOR UPDATE

-- name: load_checkpoint
SELECT cursor FROM outbox_checkpoint WHERE job_id = %(job_id)s

-- name: save_checkpoint
-- In the unit's transaction, after fence_unit: the cursor commits with the work it covers.
INSERT INTO outbox_checkpoint AS c (job_id, attempt, cursor, updated_at)
VALUES (%(job_id)s, %(attempt)s, %(cursor)s, now())
ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt, cursor = EXCLUDED.cursor, updated_at = now()

-- name: set_job_error
-- A watched job's structured error, set in the failing transaction before outbox_fail, so the
-- event that transition writes carries it.
UPDATE outbox_job SET error = %(error)s
 WHERE id = %(job_id)s AND status = 'running' AND attempts = %(attempt)s AND watched

-- name: expire_watched_jobs
-- Watched jobs whose status expired (expires_at passed) go at once, whatever the retention,
-- leaving a tombstone "expired". Finished ones only: a running job's expiry waits for its end.
WITH batch AS (
    SELECT j.id, j.task, j.owner, j.finished_at, t.tombstone_retention
      FROM outbox_job j
      JOIN outbox_task t ON t.name = j.task
     WHERE j.watched AND j.expires_at < now() AND j.status IN ('done', 'dead', 'cancelled')
     ORDER BY j.expires_at
     LIMIT %(limit)s
       FOR UPDATE OF j SKIP LOCKED
), tombstones AS (
    INSERT INTO outbox_tombstone (job_id, task, owner, reason, finished_at, keep_until)
    SELECT id, task, owner, 'expired', finished_at, now() + tombstone_retention FROM batch
    ON CONFLICT (job_id) DO NOTHING
), requests AS (
    DELETE FROM outbox_request r USING batch WHERE r.job_id = batch.id RETURNING r.id
), jobs AS (
    DELETE FROM outbox_job j USING batch WHERE j.id = batch.id RETURNING j.id
)
SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM requests) AS requests

-- name: forget_watched_job
-- Its owner deleted it: the job goes with its side rows, a tombstone "deleted" stays.
WITH gone AS (
    SELECT j.id, j.task, j.owner, j.finished_at, t.tombstone_retention
      FROM outbox_job j JOIN outbox_task t ON t.name = j.task
     WHERE j.id = %(job_id)s AND j.watched AND j.status IN ('done', 'dead', 'cancelled')
       FOR UPDATE OF j
), tombstone AS (
    INSERT INTO outbox_tombstone (job_id, task, owner, reason, finished_at, keep_until)
    SELECT id, task, owner, 'deleted', finished_at, now() + tombstone_retention FROM gone
    ON CONFLICT (job_id) DO NOTHING
), requests AS (
    DELETE FROM outbox_request r USING gone WHERE r.job_id = gone.id
), jobs AS (
    DELETE FROM outbox_job j USING gone WHERE j.id = gone.id RETURNING j.id
)
SELECT count(*) AS forgotten FROM jobs

-- name: prune_tombstones
DELETE FROM outbox_tombstone
 WHERE job_id = ANY(ARRAY(SELECT job_id FROM outbox_tombstone WHERE keep_until < now()
                          ORDER BY keep_until LIMIT %(limit)s))

-- name: watched_job_snapshots
-- What a watcher is shown of these jobs (newest first): each one's row and progress side row.
SELECT j.id, j.task, j.owner, j.status::text AS status, j.attempts, j.max_attempts, j.stages, j.result, j.error,
       j.cancel_requested_at, j.created_at, j.started_at, j.finished_at, j.expires_at, j.resumed_from,
       p.stage, p.stage_index, p.fraction, p.message, p.current_units, p.total_units, p.last_seq,
       p.updated_at AS progress_at
  FROM outbox_job j
  LEFT JOIN outbox_progress p ON p.job_id = j.id
 WHERE j.id = ANY(%(job_ids)s::bigint[]) AND j.watched
 ORDER BY j.id DESC

-- name: watched_jobs_of_owner
-- A watcher's own jobs of one kind, newest first, keyset-paged (ix_outbox_job_owner_task).
SELECT j.id
  FROM outbox_job j
 WHERE j.owner = %(owner)s AND j.task = %(task)s AND j.watched
   AND (%(before_id)s::bigint IS NULL OR j.id < %(before_id)s::bigint)
 ORDER BY j.id DESC
 LIMIT %(limit)s

-- name: job_events_after
SELECT seq, kind::text AS kind, attempt, data, created_at
  FROM outbox_event
 WHERE job_id = %(job_id)s AND seq > %(after_seq)s
 ORDER BY seq
 LIMIT %(limit)s

-- name: job_first_event
-- The oldest event still kept: a Last-Event-ID before it has a gap behind it (resync).
SELECT min(seq) AS first_seq FROM outbox_event WHERE job_id = %(job_id)s

-- name: job_tombstone
SELECT job_id, task, owner, reason, finished_at, created_at, keep_until
  FROM outbox_tombstone
 WHERE job_id = %(job_id)s AND keep_until > now()

-- name: resume_job
SELECT job_id, refusal FROM outbox_resume(%(job_id)s, %(correlation_id)s, %(trigger_reason)s, %(actor_type)s,
                                          %(actor_id)s)

-- name: register_watched_task
-- A watched kind's policy row, made or brought up to date by its set-up (idempotent).
INSERT INTO outbox_task (name, description, watched, stages, mode, cancellable, queue, lease_seconds,
                         time_limit_seconds, soft_time_limit_seconds, heartbeats, max_attempts, cooldown)
VALUES (%(name)s, %(description)s, true, %(stages)s, %(mode)s, %(cancellable)s, %(queue)s,
        %(lease)s, %(limit)s, %(soft)s, %(heartbeats)s, %(attempts)s, make_interval(secs => %(cooldown)s))
ON CONFLICT (name) DO UPDATE SET
    description = EXCLUDED.description, watched = true, stages = EXCLUDED.stages,
    mode = EXCLUDED.mode, cancellable = EXCLUDED.cancellable, queue = EXCLUDED.queue,
    lease_seconds = EXCLUDED.lease_seconds, time_limit_seconds = EXCLUDED.time_limit_seconds,
    soft_time_limit_seconds = EXCLUDED.soft_time_limit_seconds, heartbeats = EXCLUDED.heartbeats,
    max_attempts = EXCLUDED.max_attempts, cooldown = EXCLUDED.cooldown
