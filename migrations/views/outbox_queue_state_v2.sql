-- outbox_queue_state, version 2: as version 1, with `cancelled` counted among the terminal
-- statuses (history: NULL jobs, finishes per minute).
CREATE OR REPLACE VIEW outbox_queue_state AS
WITH live AS (
    SELECT task, status,
           count(*) AS jobs,
           min(created_at) AS oldest_created_at,
           min(next_run_at) FILTER (WHERE status = 'pending' AND next_run_at <= now()) AS oldest_due_at
      FROM outbox_job
     WHERE status IN ('pending', 'published', 'running', 'retrying', 'dead')
     GROUP BY task, status
), recent AS (
    SELECT task, status,
           count(*) FILTER (WHERE finished_at > now() - interval '1 minute') AS finished_last_1m,
           count(*) AS finished_last_5m
      FROM outbox_job
     WHERE finished_at > now() - interval '5 minutes'
     GROUP BY task, status
)
SELECT t.name AS task,
       s.status,
       CASE WHEN s.status IN ('done', 'superseded', 'cancelled') THEN NULL ELSE coalesce(l.jobs, 0) END AS jobs,
       round(extract(epoch FROM now() - l.oldest_created_at)::numeric, 3) AS oldest_age_s,
       CASE WHEN s.status = 'pending'
            THEN round(greatest(extract(epoch FROM now() - l.oldest_due_at), 0)::numeric, 3)
       END AS relay_lag_s,
       coalesce(r.finished_last_1m, 0) AS finished_last_1m,
       coalesce(r.finished_last_5m, 0) AS finished_last_5m,
       round(coalesce(r.finished_last_5m, 0) / 300.0, 3) AS per_second_5m
  FROM outbox_task t
 CROSS JOIN unnest(enum_range(NULL::outbox_job_status)) AS s(status)
  LEFT JOIN live l ON l.task = t.name AND l.status = s.status
  LEFT JOIN recent r ON r.task = t.name AND r.status = s.status;
