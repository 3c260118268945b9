-- recalq outbox lifecycle, version 5: one engine for every job kind.
--
-- Replaces outbox_enqueue_request, outbox_enqueue, outbox_start, outbox_complete, outbox_fail and
-- outbox_requeue, and adds outbox_heartbeat. Installed by migration 0011 with the task policy
-- columns (outbox_task), outbox_job.mode and the attempt history (outbox_attempt).
--
-- Why a version 5:
-- * Per-task policy. A job takes its coalescing mode from its task when it is created:
--     coalesce       one waiting + one running job per key (the recalculation, as before);
--     unique_active  at most one active (pending, published, running, retrying) job per key; a
--                    second submission is refused with the active job's id, and one within the
--                    task's cooldown of the key's last finish is refused with the time left;
--     none           every submission is its own job (the key only scopes idempotency).
--   A running attempt's lease is the task's lease_seconds unless the worker names one.
-- * Attempt history. Every finished attempt is a row of outbox_attempt (started, finished,
--   outcome, error, worker, the Celery task id it ran under), inserted by the same statement that
--   finishes it, so every error is kept, not only the last. The attempt that is running lives on
--   the job row (started_at, worker) until then: one insert per attempt, no extra update on the
--   hot path.
-- * A requeued job gets a new Celery task id: its next run is a task of its own in Flower, and
--   the first run's record there is kept.
-- * outbox_heartbeat lets a long attempt extend its lease, so a task whose time limit is longer
--   than its lease is rescued only when its worker stops heart-beating.
--
-- The contracts keep their shape: outbox_enqueue has the same signature and answers the job id;
-- outbox_enqueue_request gains two output columns (refusal, retry_after) after the four it had, so
-- callers that name its columns keep working; outbox_start keeps its four-argument form beside
-- the new five-argument one (which names the worker and answers the lease).
--
-- Errors raised here use SQLSTATE 22023 (invalid_parameter_value) and name the rule broken, 40001
-- (serialization_failure) when the key's waiting job keeps changing (retry the transaction), or
-- 55000 (object_not_in_prerequisite_state) when outbox_enqueue is refused by a unique_active task.

DROP FUNCTION IF EXISTS outbox_enqueue_request(text, text, jsonb, text, text, text, text, integer, timestamptz);

-- outbox_enqueue_request: the full form. Returns the job joined or created and whether this
-- request was new; for a refused submission (unique_active only) `refusal` is 'active' (job_id is
-- the active job) or 'cooldown' (retry_after is the time left), and nothing was written.
CREATE FUNCTION outbox_enqueue_request(
    p_task text,
    p_coalescing_key text,
    p_payload jsonb,
    p_correlation_id text,
    p_trigger_reason text,
    p_actor_type text,
    p_actor_id text,
    p_max_attempts integer DEFAULT NULL,
    p_run_at timestamptz DEFAULT NULL
) RETURNS TABLE (job_id bigint, request_id bigint, created_request boolean, created_job boolean,
                 refusal text, retry_after interval)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_known text;
    v_max_attempts integer;
    v_job bigint;
    v_new_job boolean := false;
    v_request bigint;
    v_min_interval interval;
    v_mode outbox_coalescing_mode;
    v_cooldown interval;
    v_run_at timestamptz;
    v_last_start timestamptz;
    v_last_finish timestamptz;
BEGIN
    SELECT t.max_attempts, t.min_interval, t.mode, t.cooldown
      INTO v_max_attempts, v_min_interval, v_mode, v_cooldown
      FROM outbox_task t WHERE t.name = p_task;
    IF NOT FOUND THEN
        SELECT string_agg(t.name, ', ' ORDER BY t.name) INTO v_known FROM outbox_task t;
        RAISE EXCEPTION 'outbox_enqueue: unknown task "%"', p_task
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('known tasks: %s', coalesce(v_known, '(none registered)'));
    END IF;
    IF p_coalescing_key IS NULL OR p_coalescing_key !~ '[^[:space:]]' THEN  -- blank: spaces, tabs, newlines
        RAISE EXCEPTION 'outbox_enqueue: coalescing_key must be a non-empty string'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(p_coalescing_key) > 200 THEN
        RAISE EXCEPTION 'outbox_enqueue: coalescing_key is % characters; the limit is 200', length(p_coalescing_key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'outbox_enqueue: payload must be a JSON object, got %', coalesce(jsonb_typeof(p_payload), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(p_payload::text) > 8192 THEN
        RAISE EXCEPTION 'outbox_enqueue: payload is % bytes; the limit is 8192 (carry ids, not data)', octet_length(p_payload::text)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_correlation_id IS NULL OR p_correlation_id !~ '[^[:space:]]' OR length(p_correlation_id) > 200 THEN
        RAISE EXCEPTION 'outbox_enqueue: correlation_id must be a non-empty string of at most 200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_trigger_reason IS NULL OR p_trigger_reason !~ '^[a-z][a-z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'outbox_enqueue: trigger_reason "%" must match ^[a-z][a-z0-9_]{0,63}$', p_trigger_reason
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_actor_type IS NULL OR p_actor_type !~ '^[a-z][a-z0-9_]{0,31}$' THEN
        RAISE EXCEPTION 'outbox_enqueue: actor_type "%" must match ^[a-z][a-z0-9_]{0,31}$', p_actor_type
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_actor_id IS NOT NULL AND length(p_actor_id) > 200 THEN
        RAISE EXCEPTION 'outbox_enqueue: actor_id is longer than 200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_max_attempts := coalesce(p_max_attempts, v_max_attempts);
    IF v_max_attempts < 1 OR v_max_attempts > 100 THEN
        RAISE EXCEPTION 'outbox_enqueue: max_attempts must be between 1 and 100, got %', v_max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- A repeat of an accepted request is a no-op that answers with the first request, whatever
    -- has happened to its job since.
    SELECT r.job_id, r.id INTO v_job, v_request
      FROM outbox_request r
     WHERE r.coalescing_key = p_coalescing_key AND r.correlation_id = p_correlation_id;
    IF FOUND THEN
        RETURN QUERY SELECT v_job, v_request, false, false, NULL::text, NULL::interval;
        RETURN;
    END IF;

    IF v_mode = 'coalesce' THEN
        -- Join the key's job that has not started yet, or create one (outbox_v3.sql explains
        -- the lock, the rounds and the minimum interval; nothing of it changed).
        FOR v_round IN 1..5 LOOP
            SELECT j.id INTO v_job FROM outbox_job j
             WHERE j.coalescing_key = p_coalescing_key AND j.mode = 'coalesce'
               AND j.status IN ('pending', 'published', 'retrying')
               FOR NO KEY UPDATE;
            EXIT WHEN FOUND;
            v_run_at := coalesce(p_run_at, now());
            IF v_min_interval > interval '0' THEN
                SELECT j.started_at INTO v_last_start FROM outbox_job j
                 WHERE j.coalescing_key = p_coalescing_key AND j.started_at IS NOT NULL
                 ORDER BY j.id DESC
                 LIMIT 1;
                v_run_at := greatest(v_run_at, v_last_start + v_min_interval);  -- greatest skips NULL
            END IF;
            INSERT INTO outbox_job AS j (task, coalescing_key, payload, max_attempts, next_run_at, mode)
            VALUES (p_task, p_coalescing_key, p_payload, v_max_attempts, v_run_at, 'coalesce')
            ON CONFLICT (coalescing_key) WHERE mode = 'coalesce' AND status IN ('pending', 'published', 'retrying')
            DO NOTHING
            RETURNING j.id INTO v_job;
            v_new_job := v_job IS NOT NULL;
            EXIT WHEN v_new_job;
        END LOOP;
        IF v_job IS NULL THEN
            RAISE EXCEPTION 'outbox_enqueue: the waiting job of key "%" kept changing under us; retry the transaction', p_coalescing_key
                USING ERRCODE = 'serialization_failure';
        END IF;
    ELSIF v_mode = 'unique_active' THEN
        -- The key is a lock: the partial unique index over the active statuses refuses a second
        -- active job, and the job's own terminal transition releases it (nothing can leak).
        SELECT j.id INTO v_job FROM outbox_job j
         WHERE j.coalescing_key = p_coalescing_key AND j.mode = 'unique_active'
           AND j.status IN ('pending', 'published', 'running', 'retrying');
        IF FOUND THEN
            RETURN QUERY SELECT v_job, NULL::bigint, false, false, 'active'::text, NULL::interval;
            RETURN;
        END IF;
        IF v_cooldown > interval '0' THEN
            -- Counted from the previous run's finish, whatever its terminal state.
            SELECT max(j.finished_at) INTO v_last_finish FROM outbox_job j
             WHERE j.coalescing_key = p_coalescing_key AND j.mode = 'unique_active';
            IF v_last_finish + v_cooldown > now() THEN
                RETURN QUERY SELECT NULL::bigint, NULL::bigint, false, false, 'cooldown'::text,
                                    v_last_finish + v_cooldown - now();
                RETURN;
            END IF;
        END IF;
        INSERT INTO outbox_job AS j (task, coalescing_key, payload, max_attempts, next_run_at, mode)
        VALUES (p_task, p_coalescing_key, p_payload, v_max_attempts, coalesce(p_run_at, now()), 'unique_active')
        ON CONFLICT (coalescing_key) WHERE mode = 'unique_active' AND status IN ('pending', 'published', 'running', 'retrying')
        DO NOTHING
        RETURNING j.id INTO v_job;
        IF v_job IS NULL THEN
            -- Another submission committed the key's active job while this one waited on it.
            SELECT j.id INTO v_job FROM outbox_job j
             WHERE j.coalescing_key = p_coalescing_key AND j.mode = 'unique_active'
               AND j.status IN ('pending', 'published', 'running', 'retrying');
            RETURN QUERY SELECT v_job, NULL::bigint, false, false, 'active'::text, NULL::interval;
            RETURN;
        END IF;
        v_new_job := true;
    ELSE  -- 'none': every submission is its own job
        INSERT INTO outbox_job AS j (task, coalescing_key, payload, max_attempts, next_run_at, mode)
        VALUES (p_task, p_coalescing_key, p_payload, v_max_attempts, coalesce(p_run_at, now()), 'none')
        RETURNING j.id INTO v_job;
        v_new_job := true;
    END IF;

    INSERT INTO outbox_request AS r (job_id, coalescing_key, correlation_id, trigger_reason, actor_type, actor_id)
    VALUES (v_job, p_coalescing_key, p_correlation_id, p_trigger_reason, p_actor_type, p_actor_id)
    ON CONFLICT (coalescing_key, correlation_id) DO NOTHING
    RETURNING r.id INTO v_request;

    IF v_request IS NULL THEN
        -- A concurrent transaction committed the same request first; answer with it. A job we
        -- created for it is dropped (no one else can see it yet), or a repeat would cost a run.
        IF v_new_job THEN
            DELETE FROM outbox_job WHERE id = v_job;
        END IF;
        SELECT r.job_id, r.id INTO v_job, v_request
          FROM outbox_request r
         WHERE r.coalescing_key = p_coalescing_key AND r.correlation_id = p_correlation_id;
        RETURN QUERY SELECT v_job, v_request, false, false, NULL::text, NULL::interval;
        RETURN;
    END IF;

    IF v_new_job THEN
        -- A hint only: relays poll as well. Identical notifications fold into one per transaction.
        PERFORM pg_notify('outbox_job_pending', '');
    END IF;
    RETURN QUERY SELECT v_job, v_request, true, v_new_job, NULL::text, NULL::interval;
END;
$fn$;

-- outbox_enqueue: the stable producer contract. Returns the id of the job the request joined or
-- created. A unique_active task's refusal is an error here (a producer in SQL has no other way to
-- notice it); outbox_enqueue_request answers it as data instead.
CREATE OR REPLACE FUNCTION outbox_enqueue(
    task text,
    coalescing_key text,
    payload jsonb,
    correlation_id text,
    trigger_reason text,
    actor_type text,
    actor_id text,
    max_attempts integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    e record;
BEGIN
    SELECT * INTO e
      FROM outbox_enqueue_request(task, coalescing_key, payload, correlation_id,
                                  trigger_reason, actor_type, actor_id, max_attempts);
    IF e.refusal = 'active' THEN
        RAISE EXCEPTION 'outbox_enqueue: key "%" already has active job %', coalescing_key, e.job_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'the task allows one active job per key; wait for it to finish';
    ELSIF e.refusal = 'cooldown' THEN
        RAISE EXCEPTION 'outbox_enqueue: key "%" is cooling down for another % seconds', coalescing_key,
                        ceil(extract(epoch FROM e.retry_after))
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'the task waits its cooldown after a job of the key finishes';
    END IF;
    RETURN e.job_id;
END;
$fn$;

-- outbox_start: a worker asks to run a delivered job. Counts the attempt in Postgres; the job row
-- names the worker holding it. A lost attempt it takes over is recorded in outbox_attempt.
--   started    the caller now holds attempt N with a lease; run it and finish with that N
--   finished   the job is done, dead or superseded: the delivery is a stale duplicate
--   duplicate  another live attempt holds the job: drop this delivery
--   busy       another job of the same (coalesce) key is running, or the job is not due: retry later
--   dead       the previous attempt was lost and no attempt is left: the job is now DEAD
--   missing    no such job
-- p_lease NULL: the task's lease_seconds. p_worker names the worker in the attempt's row. `lease`
-- answers the lease the attempt holds, so its handler knows how often to heartbeat.
CREATE FUNCTION outbox_start(
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
    IF j.status IN ('done', 'dead', 'superseded') THEN
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

-- outbox_start, the four-argument form of version 1, for workers that name no worker: the same
-- transition, answering the columns it always answered.
CREATE OR REPLACE FUNCTION outbox_start(
    p_job_id bigint,
    p_redelivered boolean,
    p_lease interval,
    p_resume_attempt integer DEFAULT NULL
) RETURNS TABLE (outcome text, attempt integer, payload jsonb, coalescing_key text, retry_after interval)
LANGUAGE sql AS $fn$
    SELECT s.outcome, s.attempt, s.payload, s.coalescing_key, s.retry_after
      FROM outbox_start(p_job_id, p_redelivered, p_lease, p_resume_attempt, NULL::text) s;
$fn$;

-- outbox_heartbeat: the holder of attempt N extends its lease by its task's lease_seconds. False
-- means the attempt no longer holds the job (taken over, finished): stop working on it.
CREATE FUNCTION outbox_heartbeat(p_job_id bigint, p_attempt integer)
RETURNS boolean
LANGUAGE sql AS $fn$
    WITH beat AS (
        UPDATE outbox_job j
           SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => t.lease_seconds)
          FROM outbox_task t
         WHERE j.id = p_job_id AND j.status = 'running' AND j.attempts = p_attempt AND t.name = j.task
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM beat);
$fn$;

-- outbox_complete: the holder of attempt N marks its job done, inside the transaction that
-- applied the job's effects. False means the attempt was fenced out: roll those effects back.
CREATE OR REPLACE FUNCTION outbox_complete(p_job_id bigint, p_attempt integer)
RETURNS boolean
LANGUAGE sql AS $fn$
    WITH done AS (
        UPDATE outbox_job
           SET status = 'done', finished_at = now(), updated_at = now(), lease_expires_at = NULL
         WHERE id = p_job_id AND status = 'running' AND attempts = p_attempt
        RETURNING id, requeue_count, celery_task_id, worker, started_at
    ), attempt AS (
        -- A data-modifying WITH runs whether or not the query reads it.
        INSERT INTO outbox_attempt (job_id, run, attempt, celery_task_id, worker, started_at, finished_at, outcome)
        SELECT done.id, done.requeue_count, p_attempt, done.celery_task_id, done.worker, done.started_at, now(),
               'succeeded'
          FROM done
        ON CONFLICT DO NOTHING
    )
    SELECT EXISTS (SELECT 1 FROM done);
$fn$;

-- outbox_fail: the holder of attempt N records a failure. A retryable failure with attempts
-- left becomes 'retrying' at now() + p_retry_in, unless the job coalesces and its key already
-- has a waiting job: that job reads the current data, so it covers this one's requests and this
-- one is superseded by it. Otherwise the job is DEAD. The attempt's row keeps the error.
-- Returns 'retrying', 'superseded', 'dead', or 'stale' when the attempt was fenced out.
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

-- outbox_requeue: give a DEAD job a fresh set of attempts under a new Celery task id. If the job
-- coalesces and its key already has a waiting job, that job covers the dead one's requests, so
-- the dead one is superseded instead. A unique_active job whose key has another active job stays
-- DEAD (the lock is taken). Returns the id of the job that will run, or NULL when the job is not
-- DEAD or its key's lock is taken.
CREATE OR REPLACE FUNCTION outbox_requeue(p_job_id bigint)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    v_waiting bigint;
BEGIN
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND OR j.status <> 'dead' THEN
        RETURN NULL;
    END IF;
    IF j.mode = 'coalesce' THEN
        SELECT id INTO v_waiting FROM outbox_job
         WHERE coalescing_key = j.coalescing_key AND mode = 'coalesce'
           AND status IN ('pending', 'published', 'retrying')
           FOR UPDATE;
    END IF;
    IF v_waiting IS NULL THEN
        BEGIN
            UPDATE outbox_job
               SET status = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
                   requeue_count = requeue_count + 1, celery_task_id = gen_random_uuid(),
                   updated_at = now()
             WHERE id = j.id;
            PERFORM pg_notify('outbox_job_pending', '');
            RETURN j.id;
        EXCEPTION WHEN unique_violation THEN
            IF j.mode <> 'coalesce' THEN
                RETURN NULL;  -- unique_active: another job of the key holds its lock
            END IF;
            -- A producer committed the key's waiting job while this update waited on it.
            SELECT id INTO v_waiting FROM outbox_job
             WHERE coalescing_key = j.coalescing_key AND mode = 'coalesce'
               AND status IN ('pending', 'published', 'retrying')
               FOR UPDATE;
        END;
    END IF;
    UPDATE outbox_job SET status = 'superseded', superseded_by = v_waiting, updated_at = now()
     WHERE id = j.id;
    RETURN v_waiting;
END;
$fn$;
