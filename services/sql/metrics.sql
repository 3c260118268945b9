-- Queries of the Prometheus collector (recalq/metrics.py). Each scrape runs them in one short
-- transaction, so every age and window is measured from the same now().

-- name: metrics_statement_timeout
-- Bounds every statement of this scrape's transaction: a slow database answers "down", it never
-- holds the scraper past its own timeout.
SELECT set_config('statement_timeout', %(timeout)s, true);

-- name: metrics_queue_state
-- The outbox_queue_state view (migrations/views/outbox_queue_state_v1.sql), one row per task
-- and status. The rate is finished_last_5m / 300 unrounded (the view rounds per_second_5m to
-- three decimals).
SELECT task,
       status::text AS status,
       jobs,
       oldest_age_s::float8 AS oldest_age_s,
       relay_lag_s::float8 AS relay_lag_s,
       finished_last_5m / 300.0::float8 AS finished_per_second
  FROM outbox_queue_state;

-- name: metrics_audit_actions_since
-- Audit rows of one action within a window of seconds, up to now.
SELECT count(*) AS n
  FROM audit_log
 WHERE action = %(action)s
   AND at > now() - make_interval(secs => %(seconds)s);
