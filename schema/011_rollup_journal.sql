-- Rollup partials kept in each ingester's memory across flushes, with a journal that makes
-- them crash-safe.
--
-- A flush no longer appends one rollup_pending row per (sensor, minute): it writes one
-- journal row naming the readings it rolled up (sensor ids and times, as two arrays), in the
-- transaction of those readings, and its ingester adds their partials to what it holds in
-- memory. Every rollups.merge_interval_s the ingester, in one transaction, deletes the
-- journal rows of the flushes it holds and upserts its aggregated partials into rollup_1m and
-- rollup_1h: one row per (sensor, bucket) per merge instead of one per flush.
--
-- Each ingester process writes under an epoch of its own (rollup_epochs) and holds a session
-- advisory lock on it while it runs. Journal rows of an epoch whose lock is free (a process
-- killed, or one whose lock connection was lost) are recovered by any ingester: their
-- readings are read back, rolled up into rollup_pending and merged from there. A reading's
-- partial is therefore in exactly one place at every commit: in a journal row (the views
-- below read it from the readings it names), in rollup_pending, or in the rollup tables.
CREATE SEQUENCE telemetry.rollup_epochs AS bigint;

CREATE TABLE telemetry.rollup_journal (
    epoch    bigint NOT NULL,           -- the writing ingester process (rollup_epochs)
    flush    bigint NOT NULL,           -- the flush part, numbered within the epoch
    sensors  integer[] NOT NULL,        -- the readings rolled up: sensor ids ...
    times    bigint[] NOT NULL,         -- ... and their times, Unix microseconds
    PRIMARY KEY (epoch, flush)
);
-- The arrays are mostly distinct numbers: compressing them costs more than it saves.
ALTER TABLE telemetry.rollup_journal ALTER COLUMN sensors SET STORAGE EXTERNAL,
                                      ALTER COLUMN times SET STORAGE EXTERNAL;

-- The readings a journal row names, as 1-minute partials of one reading each.
CREATE VIEW telemetry.rollup_journal_readings AS
SELECT time_bucket(INTERVAL '1 minute', r.time) AS bucket, r.sensor_id, r.value AS min,
       r.value AS max, r.value AS sum, 1::bigint AS count, r.value AS first,
       r.time AS first_time, r.value AS last, r.time AS last_time
  FROM telemetry.rollup_journal j
 CROSS JOIN LATERAL unnest(j.sensors, j.times) AS k(sensor_id, t)
  JOIN telemetry.readings r
    ON r.sensor_id = k.sensor_id AND r.time = timestamptz 'epoch' + k.t * INTERVAL '1 microsecond'
 WHERE r.value <> 'NaN'::double precision;

CREATE OR REPLACE VIEW telemetry.rollup_1m_all AS
SELECT bucket, sensor_id, min(min) AS min, max(max) AS max, sum(sum) AS sum,
       sum(count)::bigint AS count,
       (array_agg(first ORDER BY first_time))[1] AS first, min(first_time) AS first_time,
       (array_agg(last ORDER BY last_time DESC))[1] AS last, max(last_time) AS last_time
  FROM (SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
          FROM telemetry.rollup_1m
        UNION ALL
        SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
          FROM telemetry.rollup_pending
        UNION ALL
        SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
          FROM telemetry.rollup_journal_readings) AS u
 GROUP BY bucket, sensor_id;

CREATE OR REPLACE VIEW telemetry.rollup_1h_all AS
SELECT bucket, sensor_id, min(min) AS min, max(max) AS max, sum(sum) AS sum,
       sum(count)::bigint AS count,
       (array_agg(first ORDER BY first_time))[1] AS first, min(first_time) AS first_time,
       (array_agg(last ORDER BY last_time DESC))[1] AS last, max(last_time) AS last_time
  FROM (SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
          FROM telemetry.rollup_1h
        UNION ALL
        SELECT time_bucket(INTERVAL '1 hour', bucket), sensor_id, min, max, sum, count, first,
               first_time, last, last_time
          FROM telemetry.rollup_pending
        UNION ALL
        SELECT time_bucket(INTERVAL '1 hour', bucket), sensor_id, min, max, sum, count, first,
               first_time, last, last_time
          FROM telemetry.rollup_journal_readings) AS u
 GROUP BY bucket, sensor_id;

GRANT SELECT, INSERT, DELETE ON telemetry.rollup_journal TO ingest;
GRANT USAGE ON SEQUENCE telemetry.rollup_epochs TO ingest;
GRANT SELECT ON telemetry.rollup_journal, telemetry.rollup_journal_readings TO analyst;
