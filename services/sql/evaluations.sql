-- Property evaluations: the snapshot an evaluation job leaves behind, and its reads.

-- name: ev_insert_snapshot
-- In the job's last unit, with its completion: the snapshot exists exactly when the job is done.
-- A repeated job id (a takeover that reached this point twice) keeps the first snapshot.
INSERT INTO property_evaluations (client_id, property_id, address, job_id, answers, summary)
VALUES (%(client_id)s, %(property_id)s, %(address)s, %(job_id)s, %(answers)s, %(summary)s)
ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id
RETURNING id

-- name: ev_snapshot_of_client
SELECT e.id, e.client_id, e.property_id, e.address, e.job_id, e.answers, e.summary, e.created_at
  FROM property_evaluations e
 WHERE e.id = %(evaluation_id)s AND e.client_id = %(client_id)s

-- name: ev_snapshots_of_client
SELECT e.id, e.client_id, e.property_id, e.address, e.job_id, e.answers, e.summary, e.created_at
  FROM property_evaluations e
 WHERE e.client_id = %(client_id)s
 ORDER BY e.id DESC
 LIMIT %(limit)s
