-- recalq outbox lifecycle, version 3: replaces outbox_enqueue_request only. outbox_fail stays as
-- outbox_v2.sql defines it, the other lifecycle functions as outbox_v1.sql does.
--
-- Why a version 3: a task may set a minimum interval between the runs of one coalescing key
-- (outbox_task.min_interval, migration 0008). G3 already folds a burst into at most one waiting
-- job per key, but with a fast worker that job starts as soon as the previous one did, so a
-- key under a long burst is recalculated once per pipeline cycle (~every 2 s in the burst
-- benchmark) for as long as the burst lasts. Version 3 holds back only the job it CREATES:
--   next_run_at = greatest(now() (or p_run_at), start of the key's latest started job + min_interval)
-- so the first change after a quiet period is due at once (commit -> start latency unchanged),
-- and during a burst the key's runs start at least min_interval apart: about
-- burst / min_interval + 2 runs, whatever the number of mutations. A request that joins a
-- waiting job changes nothing about it (no extra write), as in version 2. With min_interval 0
-- (the default) nothing is read and nothing changes. The relay claims only due jobs, and
-- outbox_start answers 'busy' with retry_after to a delivery that arrives before next_run_at,
-- without counting an attempt.
--
-- Errors raised here use SQLSTATE 22023 (invalid_parameter_value) and name the rule broken, or
-- 40001 (serialization_failure) when the key's waiting job keeps changing: retry the transaction.


-- outbox_enqueue_request: the full form. Returns the job joined and whether this request was new.
CREATE OR REPLACE FUNCTION outbox_enqueue_request(
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
    v_new_job boolean := false;
    v_request bigint;
    v_min_interval interval;
    v_run_at timestamptz;
    v_last_start timestamptz;
BEGIN
    SELECT t.max_attempts, t.min_interval INTO v_max_attempts, v_min_interval FROM outbox_task t WHERE t.name = p_task;
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

    -- Join the key's job that has not started yet, or create one. Joining locks the job's row
    -- until our commit, so a worker cannot start the job between our join and our commit:
    -- whatever this transaction changed is visible to the run that follows. The lock is
    -- FOR NO KEY UPDATE, the mode outbox_start's FOR UPDATE and the relay's claim wait for
    -- (or skip), and it writes no new row version. If a worker starts the job while we wait
    -- for the lock, the row no longer qualifies and we create the key's next job instead. If
    -- another producer creates the waiting job between our look and our insert, the insert
    -- does nothing and we look again; only a job started in that same instant sends us round
    -- more than once.
    FOR v_round IN 1..5 LOOP
        SELECT j.id INTO v_job FROM outbox_job j
         WHERE j.coalescing_key = p_coalescing_key AND j.status IN ('pending', 'published', 'retrying')
           FOR NO KEY UPDATE;
        EXIT WHEN FOUND;
        -- Creating the key's next job: with a minimum interval, it is due no sooner than that
        -- long after the key's latest start (the running job's, or the last finished one's).
        -- The newest started job by (coalescing_key, id DESC), ix_outbox_job_key_id: the scan
        -- stops at the first row that started, almost always the first it reads. Read again on
        -- every round: a round repeats because a job of the key has just started.
        v_run_at := coalesce(p_run_at, now());
        IF v_min_interval > interval '0' THEN
            SELECT j.started_at INTO v_last_start FROM outbox_job j
             WHERE j.coalescing_key = p_coalescing_key AND j.started_at IS NOT NULL
             ORDER BY j.id DESC
             LIMIT 1;
            v_run_at := greatest(v_run_at, v_last_start + v_min_interval);  -- greatest skips NULL
        END IF;
        INSERT INTO outbox_job AS j (task, coalescing_key, payload, max_attempts, next_run_at)
        VALUES (p_task, p_coalescing_key, p_payload, v_max_attempts, v_run_at)
        ON CONFLICT (coalescing_key) WHERE status IN ('pending', 'published', 'retrying') DO NOTHING
        RETURNING j.id INTO v_job;
        v_new_job := v_job IS NOT NULL;
        EXIT WHEN v_new_job;
    END LOOP;
    IF v_job IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: the waiting job of key "%" kept changing under us; retry the transaction', p_coalescing_key
            USING ERRCODE = 'serialization_failure';
    END IF;

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
        -- A hint only: relays poll as well. A request that joins a waiting job sends nothing:
        -- the relay was already woken for that job. Identical notifications fold into one per
        -- transaction.
        PERFORM pg_notify('outbox_job_pending', '');
    END IF;
    RETURN QUERY SELECT v_job, v_request, true, v_new_job;
END;
$fn$;
