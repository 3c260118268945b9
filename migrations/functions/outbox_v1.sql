-- recalq outbox lifecycle functions, version 1.
--
-- These functions are the outbox's contract with every producer and worker, whatever its
-- language. They keep each state transition atomic and fenced inside Postgres, so that no
-- client can leave a job half-moved. Pinned: a later change ships as outbox_v2.sql.
--
-- Errors raised here use SQLSTATE 22023 (invalid_parameter_value) and name the rule broken.

-- outbox_enqueue_request: the full form. Returns the job joined and whether this request was new.
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
) RETURNS TABLE (job_id bigint, request_id bigint, created_request boolean, created_job boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_known text;
    v_max_attempts integer;
    v_job bigint;
    v_new_job boolean;
    v_request bigint;
BEGIN
    SELECT t.max_attempts INTO v_max_attempts FROM outbox_task t WHERE t.name = p_task;
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

    -- A repeat of an accepted request is a no-op that answers with the first request.
    SELECT r.job_id, r.id INTO v_job, v_request
      FROM outbox_request r
     WHERE r.coalescing_key = p_coalescing_key AND r.correlation_id = p_correlation_id;
    IF FOUND THEN
        RETURN QUERY SELECT v_job, v_request, false, false;
        RETURN;
    END IF;

    -- Join the key's job that has not started yet, or create one. The DO UPDATE takes the
    -- job's row lock until our commit, so a worker cannot start the job between our join and
    -- our commit: whatever this transaction changed is visible to the run that follows.
    INSERT INTO outbox_job AS j (task, coalescing_key, payload, max_attempts, next_run_at)
    VALUES (p_task, p_coalescing_key, p_payload, v_max_attempts, coalesce(p_run_at, now()))
    ON CONFLICT (coalescing_key) WHERE status IN ('pending', 'published', 'retrying')
    DO UPDATE SET coalescing_key = EXCLUDED.coalescing_key
    RETURNING j.id, (j.xmax = 0) INTO v_job, v_new_job;

    INSERT INTO outbox_request AS r (job_id, coalescing_key, correlation_id, trigger_reason, actor_type, actor_id)
    VALUES (v_job, p_coalescing_key, p_correlation_id, p_trigger_reason, p_actor_type, p_actor_id)
    ON CONFLICT (coalescing_key, correlation_id) DO NOTHING
    RETURNING r.id INTO v_request;

    IF v_request IS NULL THEN
        -- A concurrent transaction committed the same request first; answer with it. If its job
        -- started while we waited, we created a job of our own that nothing asked for: drop it
        -- (no one else can see it yet), or a repeat would cost an extra run.
        IF v_new_job THEN
            DELETE FROM outbox_job WHERE id = v_job;
        END IF;
        SELECT r.job_id, r.id INTO v_job, v_request
          FROM outbox_request r
         WHERE r.coalescing_key = p_coalescing_key AND r.correlation_id = p_correlation_id;
        RETURN QUERY SELECT v_job, v_request, false, false;
        RETURN;
    END IF;

    IF v_new_job THEN
        -- A hint only: relays poll as well. Identical notifications fold into one per transaction.
        PERFORM pg_notify('outbox_job_pending', '');
    END IF;
    RETURN QUERY SELECT v_job, v_request, true, v_new_job;
END;
$fn$;

-- outbox_enqueue: the stable producer contract. Returns the id of the job the request joined.
CREATE FUNCTION outbox_enqueue(
    task text,
    coalescing_key text,
    payload jsonb,
    correlation_id text,
    trigger_reason text,
    actor_type text,
    actor_id text,
    max_attempts integer DEFAULT NULL
) RETURNS bigint
LANGUAGE sql AS $fn$
    SELECT e.job_id
      FROM outbox_enqueue_request(task, coalescing_key, payload, correlation_id,
                                  trigger_reason, actor_type, actor_id, max_attempts) e;
$fn$;

-- outbox_start: a worker asks to run a delivered job. Counts the attempt in Postgres.
--   started    the caller now holds attempt N with a lease; run it and finish with that N
--   finished   the job is done, dead or superseded: the delivery is a stale duplicate
--   duplicate  another live attempt holds the job: drop this delivery
--   busy       another job of the same key is running, or the job is not due: retry later
--   dead       the previous attempt was lost and no attempt is left: the job is now DEAD
--   missing    no such job
CREATE FUNCTION outbox_start(
    p_job_id bigint,
    p_redelivered boolean,
    p_lease interval,
    p_resume_attempt integer DEFAULT NULL
) RETURNS TABLE (outcome text, attempt integer, payload jsonb, coalescing_key text, retry_after interval)
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    r outbox_job%ROWTYPE;
BEGIN
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::integer, NULL::jsonb, NULL::text, NULL::interval;
        RETURN;
    END IF;
    IF j.status IN ('done', 'dead', 'superseded') THEN
        RETURN QUERY SELECT 'finished'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval;
        RETURN;
    END IF;

    IF j.status = 'running' THEN
        IF p_resume_attempt IS NOT NULL AND p_resume_attempt = j.attempts THEN
            -- The same attempt comes back after an infrastructure error: it is not a new attempt.
            UPDATE outbox_job SET lease_expires_at = now() + p_lease, heartbeat_at = now(), updated_at = now()
             WHERE id = j.id;
            RETURN QUERY SELECT 'started'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval;
            RETURN;
        END IF;
        IF NOT p_redelivered AND j.lease_expires_at >= now() THEN
            RETURN QUERY SELECT 'duplicate'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval;
            RETURN;
        END IF;
        -- The holder is gone (its message came back, or its lease ran out). Its attempt counts.
        IF j.attempts >= j.max_attempts THEN
            UPDATE outbox_job
               SET status = 'dead', finished_at = now(), updated_at = now(), lease_expires_at = NULL,
                   last_error = format('attempt %s of %s was lost (worker died or lease expired)', j.attempts, j.max_attempts)
             WHERE id = j.id;
            RETURN QUERY SELECT 'dead'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval;
            RETURN;
        END IF;
        UPDATE outbox_job
           SET attempts = attempts + 1, started_at = now(), heartbeat_at = now(),
               lease_expires_at = now() + p_lease, updated_at = now(),
               last_error = format('attempt %s was lost (worker died or lease expired)', j.attempts)
         WHERE id = j.id;
        RETURN QUERY SELECT 'started'::text, j.attempts + 1, j.payload, j.coalescing_key, NULL::interval;
        RETURN;
    END IF;

    -- pending, published or retrying
    IF j.next_run_at > now() THEN
        RETURN QUERY SELECT 'busy'::text, j.attempts, j.payload, j.coalescing_key, j.next_run_at - now();
        RETURN;
    END IF;

    -- At most one running job per key: a live one makes us wait; a lost one is superseded,
    -- because this run reads the current state and so covers every request the lost run had.
    BEGIN
        SELECT * INTO r FROM outbox_job
         WHERE outbox_job.coalescing_key = j.coalescing_key AND status = 'running'
           FOR UPDATE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        -- The running job's row is locked because it is committing its effects right now: it is
        -- alive. Answer busy instead of holding this worker until that commit.
        RETURN QUERY SELECT 'busy'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval;
        RETURN;
    END;
    IF r.id IS NOT NULL THEN
        IF r.lease_expires_at >= now() THEN
            RETURN QUERY SELECT 'busy'::text, j.attempts, j.payload, j.coalescing_key, NULL::interval;
            RETURN;
        END IF;
        UPDATE outbox_job
           SET status = 'superseded', superseded_by = j.id, finished_at = now(), updated_at = now(),
               lease_expires_at = NULL
         WHERE id = r.id;
    END IF;

    UPDATE outbox_job
       SET status = 'running', attempts = attempts + 1, started_at = now(), heartbeat_at = now(),
           lease_expires_at = now() + p_lease, claimed_until = NULL, updated_at = now()
     WHERE id = j.id;
    RETURN QUERY SELECT 'started'::text, j.attempts + 1, j.payload, j.coalescing_key, NULL::interval;
END;
$fn$;

-- outbox_complete: the holder of attempt N marks its job done, inside the transaction that
-- applied the job's effects. False means the attempt was fenced out: roll those effects back.
CREATE FUNCTION outbox_complete(p_job_id bigint, p_attempt integer)
RETURNS boolean
LANGUAGE sql AS $fn$
    WITH done AS (
        UPDATE outbox_job
           SET status = 'done', finished_at = now(), updated_at = now(), lease_expires_at = NULL
         WHERE id = p_job_id AND status = 'running' AND attempts = p_attempt
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM done);
$fn$;

-- outbox_fail: the holder of attempt N records a failure. A retryable failure with attempts
-- left becomes 'retrying' at now() + p_retry_in; otherwise the job is DEAD.
-- Returns 'retrying', 'dead', or 'stale' when the attempt was fenced out.
CREATE FUNCTION outbox_fail(p_job_id bigint, p_attempt integer, p_error text, p_retryable boolean, p_retry_in interval)
RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    j outbox_job%ROWTYPE;
    v_error text := left(coalesce(nullif(p_error, ''), 'unknown error'), 2000);
BEGIN
    SELECT * INTO j FROM outbox_job WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND OR j.status <> 'running' OR j.attempts <> p_attempt THEN
        RETURN 'stale';
    END IF;
    IF p_retryable AND j.attempts < j.max_attempts THEN
        UPDATE outbox_job
           SET status = 'retrying', last_error = v_error, next_run_at = now() + p_retry_in,
               lease_expires_at = NULL, updated_at = now()
         WHERE id = j.id;
        RETURN 'retrying';
    END IF;
    UPDATE outbox_job
       SET status = 'dead', last_error = v_error, finished_at = now(), lease_expires_at = NULL, updated_at = now()
     WHERE id = j.id;
    RETURN 'dead';
END;
$fn$;

-- outbox_requeue: give a DEAD job a fresh set of attempts. If the key already has a job
-- waiting, that job covers the dead one's requests, so the dead one is superseded instead.
-- Returns the id of the job that will run, or NULL when the job is not DEAD.
CREATE FUNCTION outbox_requeue(p_job_id bigint)
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
    SELECT id INTO v_waiting FROM outbox_job
     WHERE coalescing_key = j.coalescing_key AND status IN ('pending', 'published', 'retrying')
       FOR UPDATE;
    IF FOUND THEN
        UPDATE outbox_job SET status = 'superseded', superseded_by = v_waiting, updated_at = now()
         WHERE id = j.id;
        RETURN v_waiting;
    END IF;
    UPDATE outbox_job
       SET status = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
           requeue_count = requeue_count + 1, updated_at = now()
     WHERE id = j.id;
    PERFORM pg_notify('outbox_job_pending', '');
    RETURN j.id;
END;
$fn$;
