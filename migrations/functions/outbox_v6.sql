-- recalq outbox lifecycle, version 6: jobs people watch.
--
-- Adds what a watched job (a task with outbox_task.watched) keeps for the person who started
-- it, and the terminal status `cancelled`. Installed by migration 0016.
--
-- * Events. Every change a watcher can see appends a row to outbox_event with the job's next
--   `seq` (the SSE event id and the ETag): queued, started (with the attempt), progress,
--   retrying, cancel_requested, and one final complete | error | cancelled. Lifecycle
--   transitions write theirs from a trigger on outbox_job whose WHEN clause reads only the new
--   row, so a job that is not watched (the recalculation) never enters PL/pgSQL for it.
--   Each event NOTIFYs `outbox_event` with the job id only (payloads have an 8,000-byte limit;
--   the table is the truth, the notification only wakes listeners).
-- * Progress, fenced by attempt: outbox_report_progress writes only for the attempt that holds
--   the running job, and writes an event at most every p_min_interval per job unless the
--   stage changes (the side row always has the latest values).
-- * Cancel: a request flag. outbox_cancel cancels a job that has not started at once and flags
--   a running one; the handler stops at its next unit (outbox_finish_cancelled). A flagged job
--   is never retried, and a flagged job whose worker died is cancelled, not taken over.
-- * Results and structured errors on the job row (outbox_complete's 3-argument form; the
--   caller sets `error` in the failing transaction before outbox_fail).
--
-- Replaces outbox_start (5 arguments; the 4-argument form calls it), outbox_fail; adds the
-- 3-argument outbox_complete beside the 2-argument one, which keeps its text.

-- outbox_append_event: the job's next event. The progress row holds the sequence, so two
-- writers of one job serialise on it and seq has no gaps.
CREATE FUNCTION outbox_append_event(p_job_id bigint, p_kind outbox_event_kind, p_attempt integer, p_data jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    v_seq bigint;
BEGIN
    INSERT INTO outbox_progress AS p (job_id, attempt, last_seq, last_event_at, updated_at)
    VALUES (p_job_id, coalesce(p_attempt, 0), 1, now(), now())
    ON CONFLICT (job_id) DO UPDATE
       SET last_seq = p.last_seq + 1, last_event_at = now(), updated_at = now()
    RETURNING last_seq INTO v_seq;
    INSERT INTO outbox_event (job_id, seq, kind, attempt, data)
    VALUES (p_job_id, v_seq, p_kind, p_attempt, coalesce(p_data, '{}'::jsonb));
    PERFORM pg_notify('outbox_event', p_job_id::text);
    RETURN v_seq;
END;
$fn$;

-- The trigger behind every lifecycle event of a watched job.
CREATE FUNCTION outbox_job_event() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        CASE NEW.status
            WHEN 'running' THEN
                PERFORM outbox_append_event(NEW.id, 'started', NEW.attempts, jsonb_build_object('attempt', NEW.attempts));
            WHEN 'retrying' THEN
                PERFORM outbox_append_event(NEW.id, 'retrying', NEW.attempts, jsonb_build_object(
                    'attempt', NEW.attempts, 'next_run_at', NEW.next_run_at,
                    'error', coalesce(NEW.error, jsonb_build_object('message', left(NEW.last_error, 500)))));
            WHEN 'done' THEN
                PERFORM outbox_append_event(NEW.id, 'complete', NEW.attempts, jsonb_build_object('result', NEW.result));
            WHEN 'dead' THEN
                PERFORM outbox_append_event(NEW.id, 'error', NEW.attempts, jsonb_build_object(
                    'error', coalesce(NEW.error, jsonb_build_object('message', left(NEW.last_error, 500)))));
            WHEN 'cancelled' THEN
                PERFORM outbox_append_event(NEW.id, 'cancelled', NEW.attempts, '{}'::jsonb);
            WHEN 'pending' THEN  -- requeued
                PERFORM outbox_append_event(NEW.id, 'queued', NEW.attempts, '{}'::jsonb);
            ELSE
                NULL;  -- published: still queued for a watcher
        END CASE;
    ELSIF NEW.attempts IS DISTINCT FROM OLD.attempts THEN
        -- A takeover: the same running job, a new attempt.
        PERFORM outbox_append_event(NEW.id, 'started', NEW.attempts, jsonb_build_object('attempt', NEW.attempts));
    ELSIF NEW.cancel_requested_at IS NOT NULL AND OLD.cancel_requested_at IS NULL THEN
        PERFORM outbox_append_event(NEW.id, 'cancel_requested', NEW.attempts, '{}'::jsonb);
    END IF;
    RETURN NULL;
END;
$fn$;

-- outbox_watch: makes a job just created by outbox_enqueue_request a watched one, in the same
-- transaction: its owner, a snapshot of its task's stages (so "step n of N" shows before it
-- starts), and its first event.
CREATE FUNCTION outbox_watch(p_job_id bigint, p_owner text)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    v_task text;
BEGIN
    UPDATE outbox_job j
       SET watched = true, owner = p_owner, stages = t.stages
      FROM outbox_task t
     WHERE j.id = p_job_id AND t.name = j.task AND t.watched
    RETURNING j.task INTO v_task;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox_watch: job % does not exist or its task is not watched', p_job_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN outbox_append_event(p_job_id, 'queued', 0, '{}'::jsonb);
END;
$fn$;

-- outbox_report_progress: the holder of attempt N reports where it is. 'stale' when the attempt
-- no longer holds a running job (taken over, finished, cancelled): nothing is written.
-- 'event' when an event was written, 'saved' when only the side row was (throttled).
CREATE FUNCTION outbox_report_progress(
    p_job_id bigint,
    p_attempt integer,
    p_stage text,
    p_fraction double precision,
    p_message text,
    p_current bigint,
    p_total bigint,
    p_min_interval interval
) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    p outbox_progress%ROWTYPE;
    v_index integer;
BEGIN
    -- FOR SHARE: a completion waits for this write, or this write sees the completion.
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR SHARE;
    IF NOT FOUND OR j.status <> 'running' OR j.attempts <> p_attempt OR NOT j.watched THEN
        RETURN 'stale';
    END IF;
    IF p_stage IS NOT NULL THEN
        SELECT s.ordinality - 1 INTO v_index
          FROM jsonb_array_elements(j.stages) WITH ORDINALITY AS s(stage, ordinality)
         WHERE s.stage ->> 'key' = p_stage;
        IF v_index IS NULL THEN
            RAISE EXCEPTION 'outbox_report_progress: job % has no stage "%"', p_job_id, p_stage
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    SELECT * INTO p FROM outbox_progress WHERE job_id = p_job_id FOR UPDATE;
    UPDATE outbox_progress
       SET attempt = p_attempt, stage = coalesce(p_stage, stage),
           stage_index = coalesce(v_index, stage_index),
           fraction = p_fraction, message = left(p_message, 500), current_units = p_current,
           total_units = p_total, updated_at = now()
     WHERE job_id = p_job_id;
    IF p.stage IS DISTINCT FROM coalesce(p_stage, p.stage) OR p.last_event_at IS NULL
       OR p.last_event_at <= now() - p_min_interval THEN
        PERFORM outbox_append_event(p_job_id, 'progress', p_attempt, jsonb_strip_nulls(jsonb_build_object(
            'stage', coalesce(p_stage, p.stage), 'stage_index', coalesce(v_index, p.stage_index),
            'fraction', p_fraction, 'message', left(p_message, 500), 'current', p_current, 'total', p_total)));
        RETURN 'event';
    END IF;
    RETURN 'saved';
END;
$fn$;

-- outbox_cancel: asks a job to stop. 'cancelled': it had not started and is cancelled now;
-- 'requested': it is running and stops at its next unit; 'finished': it had already ended
-- (nothing changes); 'not_cancellable': its task forbids it; 'missing': no such job.
CREATE FUNCTION outbox_cancel(p_job_id bigint)
RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    v_cancellable boolean;
BEGIN
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    SELECT t.cancellable INTO v_cancellable FROM outbox_task t WHERE t.name = j.task;
    IF NOT coalesce(v_cancellable, false) THEN
        RETURN 'not_cancellable';
    END IF;
    IF j.status IN ('done', 'dead', 'superseded', 'cancelled') THEN
        RETURN 'finished';
    END IF;
    IF j.status = 'running' THEN
        UPDATE outbox_job SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
         WHERE id = j.id;
        RETURN 'requested';
    END IF;
    UPDATE outbox_job
       SET status = 'cancelled', cancel_requested_at = coalesce(cancel_requested_at, now()), finished_at = now(),
           lease_expires_at = NULL, claimed_until = NULL, updated_at = now()
     WHERE id = j.id;
    RETURN 'cancelled';
END;
$fn$;

-- outbox_finish_cancelled: the holder of attempt N stops at a unit boundary because a cancel
-- was requested. False: the attempt no longer holds the job.
CREATE FUNCTION outbox_finish_cancelled(p_job_id bigint, p_attempt integer)
RETURNS boolean
LANGUAGE sql AS $fn$
    WITH stopped AS (
        UPDATE outbox_job
           SET status = 'cancelled', finished_at = now(), updated_at = now(), lease_expires_at = NULL
         WHERE id = p_job_id AND status = 'running' AND attempts = p_attempt AND cancel_requested_at IS NOT NULL
        RETURNING id, requeue_count, celery_task_id, worker, started_at
    ), attempt AS (
        INSERT INTO outbox_attempt (job_id, run, attempt, celery_task_id, worker, started_at, finished_at, outcome)
        SELECT s.id, s.requeue_count, p_attempt, s.celery_task_id, s.worker, s.started_at, now(), 'cancelled'
          FROM stopped s
        ON CONFLICT DO NOTHING
    )
    SELECT EXISTS (SELECT 1 FROM stopped);
$fn$;

-- outbox_complete, 3 arguments: as the 2-argument form, and keeps the job's result (a small
-- reference to what it made, which outlives the job) for its watchers.
CREATE FUNCTION outbox_complete(p_job_id bigint, p_attempt integer, p_result jsonb)
RETURNS boolean
LANGUAGE sql AS $fn$
    WITH done AS (
        UPDATE outbox_job
           SET status = 'done', finished_at = now(), updated_at = now(), lease_expires_at = NULL, result = p_result
         WHERE id = p_job_id AND status = 'running' AND attempts = p_attempt
        RETURNING id, requeue_count, celery_task_id, worker, started_at
    ), attempt AS (
        INSERT INTO outbox_attempt (job_id, run, attempt, celery_task_id, worker, started_at, finished_at, outcome)
        SELECT done.id, done.requeue_count, p_attempt, done.celery_task_id, done.worker, done.started_at, now(),
               'succeeded'
          FROM done
        ON CONFLICT DO NOTHING
    )
    SELECT EXISTS (SELECT 1 FROM done);
$fn$;

-- outbox_start, 5 arguments: as version 5, and a cancelled job is finished; a running job whose
-- cancel was requested and whose worker is gone is cancelled instead of taken over.
CREATE OR REPLACE FUNCTION outbox_start(
    p_job_id bigint,
    p_redelivered boolean,
    p_lease interval,
    p_resume_attempt integer,
    p_worker text
) RETURNS TABLE (outcome text, attempt integer, payload jsonb, coalescing_key text, retry_after interval,
                 lease interval)
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    r outbox_job%ROWTYPE;
    v_lease interval := p_lease;
    v_worker text := left(p_worker, 200);
BEGIN
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::integer, NULL::jsonb, NULL::text, NULL::interval, v_lease;
        RETURN;
    END IF;
    IF j.status IN ('done', 'dead', 'superseded', 'cancelled') THEN
        RETURN QUERY SELECT 'finished'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval, v_lease;
        RETURN;
    END IF;
    IF v_lease IS NULL THEN
        SELECT make_interval(secs => t.lease_seconds) INTO v_lease FROM outbox_task t WHERE t.name = j.task;
    END IF;

    IF j.status = 'running' THEN
        IF p_resume_attempt IS NOT NULL AND p_resume_attempt = j.attempts THEN
            -- The same attempt comes back after an infrastructure error: it is not a new attempt.
            UPDATE outbox_job SET lease_expires_at = now() + v_lease, heartbeat_at = now(), updated_at = now()
             WHERE id = j.id;
            RETURN QUERY SELECT 'started'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval, v_lease;
            RETURN;
        END IF;
        IF NOT p_redelivered AND j.lease_expires_at >= now() THEN
            RETURN QUERY SELECT 'duplicate'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval, v_lease;
            RETURN;
        END IF;
        -- The holder is gone (its message came back, or its lease ran out). Its attempt counts.
        INSERT INTO outbox_attempt (job_id, run, attempt, celery_task_id, worker, started_at, finished_at, outcome, error)
        VALUES (j.id, j.requeue_count, j.attempts, j.celery_task_id, j.worker, j.started_at, now(), 'lost',
                'worker died or lease expired')
        ON CONFLICT DO NOTHING;
        IF j.cancel_requested_at IS NOT NULL THEN
            -- Its watcher asked it to stop: it is cancelled, not taken over.
            UPDATE outbox_job
               SET status = 'cancelled', finished_at = now(), updated_at = now(), lease_expires_at = NULL
             WHERE id = j.id;
            RETURN QUERY SELECT 'finished'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval, v_lease;
            RETURN;
        END IF;
        IF j.attempts >= j.max_attempts THEN
            UPDATE outbox_job
               SET status = 'dead', finished_at = now(), updated_at = now(), lease_expires_at = NULL,
                   last_error = format('attempt %s of %s was lost (worker died or lease expired)', j.attempts, j.max_attempts)
             WHERE id = j.id;
            RETURN QUERY SELECT 'dead'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval, v_lease;
            RETURN;
        END IF;
        UPDATE outbox_job
           SET attempts = attempts + 1, started_at = now(), heartbeat_at = now(),
               lease_expires_at = now() + v_lease, updated_at = now(), worker = v_worker,
               last_error = format('attempt %s was lost (worker died or lease expired)', j.attempts)
         WHERE id = j.id;
        RETURN QUERY SELECT 'started'::text, j.attempts + 1, j.payload, j.coalescing_key, NULL::interval, v_lease;
        RETURN;
    END IF;

    -- pending, published or retrying
    IF j.next_run_at > now() THEN
        RETURN QUERY SELECT 'busy'::text, j.attempts, j.payload, j.coalescing_key, j.next_run_at - now(), v_lease;
        RETURN;
    END IF;

    IF j.mode = 'coalesce' THEN
        -- At most one running job per key: a live one makes us wait; a lost one is superseded,
        -- because this run reads the current state and so covers every request the lost run had.
        BEGIN
            SELECT * INTO r FROM outbox_job
             WHERE outbox_job.coalescing_key = j.coalescing_key AND mode = 'coalesce' AND status = 'running'
               FOR UPDATE NOWAIT;
        EXCEPTION WHEN lock_not_available THEN
            -- The running job's row is locked because it is committing its effects right now: it
            -- is alive. Answer busy instead of holding this worker until that commit.
            RETURN QUERY SELECT 'busy'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval, v_lease;
            RETURN;
        END;
        IF r.id IS NOT NULL THEN
            IF r.lease_expires_at >= now() THEN
                RETURN QUERY SELECT 'busy'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval, v_lease;
                RETURN;
            END IF;
            UPDATE outbox_job
               SET status = 'superseded', superseded_by = j.id, finished_at = now(), updated_at = now(),
                   lease_expires_at = NULL
             WHERE id = r.id;
            INSERT INTO outbox_attempt (job_id, run, attempt, celery_task_id, worker, started_at, finished_at,
                                        outcome, error)
            VALUES (r.id, r.requeue_count, r.attempts, r.celery_task_id, r.worker, r.started_at, now(), 'lost',
                    'worker died or lease expired')
            ON CONFLICT DO NOTHING;
        END IF;
    END IF;

    UPDATE outbox_job
       SET status = 'running', attempts = attempts + 1, started_at = now(), heartbeat_at = now(),
           lease_expires_at = now() + v_lease, claimed_until = NULL, updated_at = now(), worker = v_worker
     WHERE id = j.id;
    RETURN QUERY SELECT 'started'::text, j.attempts + 1, j.payload, j.coalescing_key, NULL::interval, v_lease;
END;
$fn$;

-- outbox_fail: as version 5, and a job whose cancel was requested is not retried: it ends
-- 'cancelled' (returned as such).
CREATE OR REPLACE FUNCTION outbox_fail(p_job_id bigint, p_attempt integer, p_error text, p_retryable boolean, p_retry_in interval)
RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    v_error text := left(coalesce(nullif(p_error, ''), 'unknown error'), 2000);
    v_waiting bigint;
BEGIN
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND OR j.status <> 'running' OR j.attempts <> p_attempt THEN
        RETURN 'stale';
    END IF;
    INSERT INTO outbox_attempt (job_id, run, attempt, celery_task_id, worker, started_at, finished_at, outcome, error)
    VALUES (j.id, j.requeue_count, p_attempt, j.celery_task_id, j.worker, j.started_at, now(), 'failed', v_error)
    ON CONFLICT DO NOTHING;
    IF j.cancel_requested_at IS NOT NULL THEN
        -- A job asked to stop is never retried: the failure ends it as cancelled.
        UPDATE outbox_job
           SET status = 'cancelled', last_error = v_error, finished_at = now(), lease_expires_at = NULL,
               updated_at = now()
         WHERE id = j.id;
        RETURN 'cancelled';
    END IF;
    IF p_retryable AND j.attempts < j.max_attempts THEN
        IF j.mode = 'coalesce' THEN
            SELECT id INTO v_waiting FROM outbox_job
             WHERE coalescing_key = j.coalescing_key AND mode = 'coalesce'
               AND status IN ('pending', 'published', 'retrying');
        END IF;
        IF v_waiting IS NULL THEN
            BEGIN
                UPDATE outbox_job
                   SET status = 'retrying', last_error = v_error, next_run_at = now() + p_retry_in,
                       lease_expires_at = NULL, updated_at = now()
                 WHERE id = j.id;
                RETURN 'retrying';
            EXCEPTION WHEN unique_violation THEN
                -- A producer committed the key's waiting job while this update waited on it.
                SELECT id INTO v_waiting FROM outbox_job
                 WHERE coalescing_key = j.coalescing_key AND mode = 'coalesce'
                   AND status IN ('pending', 'published', 'retrying');
            END;
        END IF;
        UPDATE outbox_job
           SET status = 'superseded', superseded_by = v_waiting, last_error = v_error,
               finished_at = now(), lease_expires_at = NULL, updated_at = now()
         WHERE id = j.id;
        RETURN 'superseded';
    END IF;
    UPDATE outbox_job
       SET status = 'dead', last_error = v_error, finished_at = now(), lease_expires_at = NULL, updated_at = now()
     WHERE id = j.id;
    RETURN 'dead';
END;
$fn$;

-- outbox_resume: a new job that carries on where a failed or cancelled watched job stopped: the
-- same task, key, payload, owner and stages, the old job's checkpoint, and the key's lock (a
-- unique_active task refuses it while another job of the key is active: refusal 'active' with
-- that job's id) but not its cooldown. Refusal 'not_resumable' when the job is not a watched job
-- that failed or was cancelled. A repeated correlation id answers the first resume's job.
CREATE FUNCTION outbox_resume(
    p_job_id bigint,
    p_correlation_id text,
    p_trigger_reason text,
    p_actor_type text,
    p_actor_id text
) RETURNS TABLE (job_id bigint, refusal text)
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    v_job bigint;
    v_request bigint;
    v_max_attempts integer;
BEGIN
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND OR NOT j.watched OR j.status NOT IN ('dead', 'cancelled') THEN
        RETURN QUERY SELECT NULL::bigint, 'not_resumable'::text;
        RETURN;
    END IF;
    SELECT r.job_id INTO v_job FROM outbox_request r
     WHERE r.coalescing_key = j.coalescing_key AND r.correlation_id = p_correlation_id;
    IF FOUND THEN
        RETURN QUERY SELECT v_job, NULL::text;
        RETURN;
    END IF;
    SELECT t.max_attempts INTO v_max_attempts FROM outbox_task t WHERE t.name = j.task;
    IF j.mode = 'unique_active' THEN
        INSERT INTO outbox_job AS n (task, coalescing_key, payload, max_attempts, next_run_at, mode, watched, owner,
                                     stages, resumed_from)
        VALUES (j.task, j.coalescing_key, j.payload, v_max_attempts, now(), j.mode, true, j.owner, j.stages, j.id)
        ON CONFLICT (coalescing_key) WHERE mode = 'unique_active' AND status IN ('pending', 'published', 'running', 'retrying')
        DO NOTHING
        RETURNING n.id INTO v_job;
        IF v_job IS NULL THEN
            SELECT a.id INTO v_job FROM outbox_job a
             WHERE a.coalescing_key = j.coalescing_key AND a.mode = 'unique_active'
               AND a.status IN ('pending', 'published', 'running', 'retrying');
            RETURN QUERY SELECT v_job, 'active'::text;
            RETURN;
        END IF;
    ELSE
        INSERT INTO outbox_job AS n (task, coalescing_key, payload, max_attempts, next_run_at, mode, watched, owner,
                                     stages, resumed_from)
        VALUES (j.task, j.coalescing_key, j.payload, v_max_attempts, now(), j.mode, true, j.owner, j.stages, j.id)
        RETURNING n.id INTO v_job;
    END IF;
    INSERT INTO outbox_request AS r (job_id, coalescing_key, correlation_id, trigger_reason, actor_type, actor_id)
    VALUES (v_job, j.coalescing_key, p_correlation_id, p_trigger_reason, p_actor_type, p_actor_id)
    ON CONFLICT (coalescing_key, correlation_id) DO NOTHING
    RETURNING r.id INTO v_request;
    IF v_request IS NULL THEN
        DELETE FROM outbox_job WHERE id = v_job;
        SELECT r.job_id INTO v_job FROM outbox_request r
         WHERE r.coalescing_key = j.coalescing_key AND r.correlation_id = p_correlation_id;
        RETURN QUERY SELECT v_job, NULL::text;
        RETURN;
    END IF;
    INSERT INTO outbox_checkpoint (job_id, attempt, cursor)
    SELECT v_job, c.attempt, c.cursor FROM outbox_checkpoint c WHERE c.job_id = j.id;
    PERFORM outbox_append_event(v_job, 'queued', 0, jsonb_build_object('resumed_from', j.id));
    PERFORM pg_notify('outbox_job_pending', '');
    RETURN QUERY SELECT v_job, NULL::text;
END;
$fn$;
