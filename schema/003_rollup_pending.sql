-- Rollup partials are appended by each flush and merged into the rollup tables in bulk, so that
-- a flush costs one COPY of its partials instead of an upsert per sensor per width.
--
-- Every flush writes the 1-minute partials of its new readings here, in its own transaction;
-- an ingester moves them into telemetry.rollup_1m and telemetry.rollup_1h every
-- rollups.merge_interval_s in one transaction (delete, aggregate, upsert). One instance merges
-- at a time (an advisory lock); a partial is in exactly one place at every commit, so the
-- *_all views and the analysts' views, which add the partials to the merged rows, are exact
-- whatever the number of instances, restarts or kills.
CREATE TABLE telemetry.rollup_pending (
    bucket      timestamptz NOT NULL,            -- the minute
    sensor_id   integer NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    sum         double precision NOT NULL,
    count       bigint NOT NULL,
    first       double precision NOT NULL,
    first_time  timestamptz NOT NULL,
    last        double precision NOT NULL,
    last_time   timestamptz NOT NULL
);

-- Merged rows and the partials not merged yet, combined: what the rollup tables will hold
-- after the next merge. Conditions on bucket and sensor_id reach both tables' scans.
CREATE VIEW telemetry.rollup_1m_all AS
SELECT bucket, sensor_id, min(min) AS min, max(max) AS max, sum(sum) AS sum,
       sum(count)::bigint AS count,
       (array_agg(first ORDER BY first_time))[1] AS first, min(first_time) AS first_time,
       (array_agg(last ORDER BY last_time DESC))[1] AS last, max(last_time) AS last_time
  FROM (SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
          FROM telemetry.rollup_1m
        UNION ALL
        SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
          FROM telemetry.rollup_pending) AS u
 GROUP BY bucket, sensor_id;

CREATE VIEW telemetry.rollup_1h_all AS
SELECT bucket, sensor_id, min(min) AS min, max(max) AS max, sum(sum) AS sum,
       sum(count)::bigint AS count,
       (array_agg(first ORDER BY first_time))[1] AS first, min(first_time) AS first_time,
       (array_agg(last ORDER BY last_time DESC))[1] AS last, max(last_time) AS last_time
  FROM (SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
          FROM telemetry.rollup_1h
        UNION ALL
        SELECT time_bucket(INTERVAL '1 hour', bucket), sensor_id, min, max, sum, count, first,
               first_time, last, last_time
          FROM telemetry.rollup_pending) AS u
 GROUP BY bucket, sensor_id;

CREATE OR REPLACE VIEW telemetry.rollup_1m_v AS
SELECT r.bucket, d.path AS device, s.name AS sensor, r.min, r.max, r.sum / r.count AS avg,
       r.count, r.first, r.last, r.first_time, r.last_time
  FROM telemetry.rollup_1m_all r
  JOIN telemetry.sensors s ON s.id = r.sensor_id
  JOIN telemetry.devices d ON d.id = s.device_id;

CREATE OR REPLACE VIEW telemetry.rollup_1h_v AS
SELECT r.bucket, d.path AS device, s.name AS sensor, r.min, r.max, r.sum / r.count AS avg,
       r.count, r.first, r.last, r.first_time, r.last_time
  FROM telemetry.rollup_1h_all r
  JOIN telemetry.sensors s ON s.id = r.sensor_id
  JOIN telemetry.devices d ON d.id = s.device_id;

GRANT SELECT, INSERT, DELETE ON telemetry.rollup_pending TO ingest;
GRANT SELECT ON telemetry.rollup_pending, telemetry.rollup_1m_all, telemetry.rollup_1h_all
    TO analyst;
