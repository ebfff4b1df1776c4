-- Rollups computed on the way in and merged by upsert, and anomaly events.

-- One row per (sensor, bucket). Partial rollups from several flushes or ingesters merge exactly:
-- min of mins, max of maxes, sums and counts added, first and last by their times.
CREATE TABLE telemetry.rollup_1m (
    bucket      timestamptz NOT NULL,
    sensor_id   integer NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    sum         double precision NOT NULL,
    count       bigint NOT NULL,
    first       double precision NOT NULL,
    first_time  timestamptz NOT NULL,
    last        double precision NOT NULL,
    last_time   timestamptz NOT NULL,
    CONSTRAINT rollup_1m_sensor_bucket_key UNIQUE (sensor_id, bucket)
);
SELECT create_hypertable('telemetry.rollup_1m', by_range('bucket', INTERVAL '7 days'),
                         create_default_indexes => false);

CREATE TABLE telemetry.rollup_1h (
    bucket      timestamptz NOT NULL,
    sensor_id   integer NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    sum         double precision NOT NULL,
    count       bigint NOT NULL,
    first       double precision NOT NULL,
    first_time  timestamptz NOT NULL,
    last        double precision NOT NULL,
    last_time   timestamptz NOT NULL,
    CONSTRAINT rollup_1h_sensor_bucket_key UNIQUE (sensor_id, bucket)
);
SELECT create_hypertable('telemetry.rollup_1h', by_range('bucket', INTERVAL '90 days'),
                         create_default_indexes => false);

-- An ongoing condition is one row, keyed by its start; end_time stays NULL until it ends.
CREATE TABLE telemetry.anomalies (
    start_time  timestamptz NOT NULL,
    sensor_id   integer NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('range', 'rate', 'spike', 'drift', 'flatline')),
    end_time    timestamptz,
    value       double precision,
    score       double precision,
    detail      text NOT NULL DEFAULT '',
    CONSTRAINT anomalies_sensor_kind_start_key UNIQUE (sensor_id, kind, start_time)
);
SELECT create_hypertable('telemetry.anomalies', by_range('start_time', INTERVAL '30 days'),
                         create_default_indexes => false);

CREATE VIEW telemetry.rollup_1m_v AS
SELECT r.bucket, d.path AS device, s.name AS sensor, r.min, r.max, r.sum / r.count AS avg,
       r.count, r.first, r.last, r.first_time, r.last_time
  FROM telemetry.rollup_1m r
  JOIN telemetry.sensors s ON s.id = r.sensor_id
  JOIN telemetry.devices d ON d.id = s.device_id;

CREATE VIEW telemetry.rollup_1h_v AS
SELECT r.bucket, d.path AS device, s.name AS sensor, r.min, r.max, r.sum / r.count AS avg,
       r.count, r.first, r.last, r.first_time, r.last_time
  FROM telemetry.rollup_1h r
  JOIN telemetry.sensors s ON s.id = r.sensor_id
  JOIN telemetry.devices d ON d.id = s.device_id;

CREATE VIEW telemetry.anomalies_v AS
SELECT a.start_time AS ts, d.path AS device, s.name AS sensor, a.kind, a.value, a.score,
       a.detail, a.end_time AS end_ts
  FROM telemetry.anomalies a
  JOIN telemetry.sensors s ON s.id = a.sensor_id
  JOIN telemetry.devices d ON d.id = s.device_id;

GRANT SELECT, INSERT ON telemetry.rollup_1m, telemetry.rollup_1h, telemetry.anomalies TO ingest;
GRANT UPDATE (min, max, sum, count, first, first_time, last, last_time)
    ON telemetry.rollup_1m, telemetry.rollup_1h TO ingest;
GRANT UPDATE (end_time, value, score, detail) ON telemetry.anomalies TO ingest;
GRANT SELECT ON telemetry.rollup_1m, telemetry.rollup_1h, telemetry.anomalies,
                telemetry.rollup_1m_v, telemetry.rollup_1h_v, telemetry.anomalies_v TO analyst;
