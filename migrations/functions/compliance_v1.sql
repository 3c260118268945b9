-- recalq compliance domain functions, version 1.

-- The property id a recalculation payload names, or NULL when the payload is malformed.
-- Never raises, so a poison payload cannot break the queue view or its index.
CREATE FUNCTION compliance_property_id(p_payload jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN p_payload->>'property_id' ~ '^[0-9]{1,18}$'
                THEN (p_payload->>'property_id')::bigint END;
$fn$;

-- compliance_request_recalculation: ask for a property's score to be recomputed, inside the
-- caller's transaction. Any producer calls it after (or as part of) its mutation.
--
-- The property row is locked before the outbox is touched: a running recalculation holds the
-- same lock while it reads, so either it sees this transaction's changes or this transaction
-- sees it finished and gets a fresh job. A new request bumps the property's generation, which
-- makes compliance_score_pending true until a recalculation has read that generation.
-- A repeated (property, correlation_id) changes nothing and answers with the first job.
CREATE FUNCTION compliance_request_recalculation(
    p_property_id bigint,
    p_correlation_id text,
    p_trigger_reason text,
    p_actor_type text,
    p_actor_id text,
    p_max_attempts integer DEFAULT NULL,
    p_mark_pending boolean DEFAULT true
) RETURNS TABLE (job_id bigint, created_request boolean, created_job boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    e record;
BEGIN
    PERFORM 1 FROM properties WHERE id = p_property_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'compliance_request_recalculation: property % does not exist', p_property_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO e
      FROM outbox_enqueue_request('compliance.recalculate_property', 'property:' || p_property_id,
                                  jsonb_build_object('property_id', p_property_id), p_correlation_id,
                                  p_trigger_reason, p_actor_type, p_actor_id, p_max_attempts);
    IF e.created_request AND p_mark_pending THEN
        UPDATE properties SET generation = generation + 1, updated_at = now() WHERE id = p_property_id;
    END IF;
    RETURN QUERY SELECT e.job_id, e.created_request, e.created_job;
END;
$fn$;
