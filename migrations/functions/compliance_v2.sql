-- recalq compliance domain functions, version 2: what the web page's live "Updating…" hears.

-- A property's score or its pending flag changed (a mutation asked for a recalculation, or one
-- landed): tell the API processes, naming only the client, so each one re-reads the properties
-- of that client's open pages. The row is the truth; the notification only wakes.
CREATE FUNCTION compliance_property_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('compliance_property', NEW.client_id::text);
    RETURN NULL;
END;
$fn$;
