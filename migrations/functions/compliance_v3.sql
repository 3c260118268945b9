-- recalq compliance domain functions, version 3: a property's page hears when its recalculation dies.

-- A recalculation became DEAD: its property now shows "Update failed" (the score stays pending
-- until an operator requeues it), which no column of `properties` announces. Tell the API
-- processes, naming only the property's client, as compliance_property_changed does.
CREATE FUNCTION compliance_recalculation_died() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    v_client bigint;
BEGIN
    SELECT p.client_id INTO v_client FROM properties p WHERE p.id = compliance_property_id(NEW.payload);
    IF v_client IS NOT NULL THEN
        PERFORM pg_notify('compliance_property', v_client::text);
    END IF;
    RETURN NULL;
END;
$fn$;
