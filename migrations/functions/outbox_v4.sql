-- recalq outbox lifecycle, version 4: replaces outbox_requeue only. Every other function stays as
-- outbox_v1.sql to outbox_v3.sql define it.
--
-- Why: version 1 looked for the key's waiting job and, finding none, turned the DEAD job back
-- into 'pending'. A producer whose new waiting job for the key was not committed yet is invisible
-- to that look-up, so the update waited on the unique index and then failed with a
-- unique_violation once the producer committed: the operator's requeue errored. Version 4 treats
-- that race like the waiting job it is (the same repair outbox_fail got in version 2): the DEAD
-- job is superseded by it, which reads the current data when it runs.

-- outbox_requeue: give a DEAD job a fresh set of attempts. If the key already has a job
-- waiting, that job covers the dead one's requests, so the dead one is superseded instead.
-- Returns the id of the job that will run, or NULL when the job is not DEAD.
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
    SELECT id INTO v_waiting FROM outbox_job
     WHERE coalescing_key = j.coalescing_key AND status IN ('pending', 'published', 'retrying')
       FOR UPDATE;
    IF v_waiting IS NULL THEN
        BEGIN
            UPDATE outbox_job
               SET status = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
                   requeue_count = requeue_count + 1, updated_at = now()
             WHERE id = j.id;
            PERFORM pg_notify('outbox_job_pending', '');
            RETURN j.id;
        EXCEPTION WHEN unique_violation THEN
            -- A producer committed the key's waiting job while this update waited on it.
            SELECT id INTO v_waiting FROM outbox_job
             WHERE coalescing_key = j.coalescing_key AND status IN ('pending', 'published', 'retrying')
               FOR UPDATE;
        END;
    END IF;
    UPDATE outbox_job SET status = 'superseded', superseded_by = v_waiting, updated_at = now()
     WHERE id = j.id;
    RETURN v_waiting;
END;
$fn$;
