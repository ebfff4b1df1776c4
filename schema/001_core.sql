-- Core telemetry schema: asset tree, device and sensor registry, readings, dead letters,
-- the analysts' views and the two roles' privileges.

CREATE EXTENSION IF NOT EXISTS timescaledb;

-- The service's insert-only role and the analysts' read-only role. Created here without LOGIN
-- when absent; whoever deploys gives them LOGIN and a password (deploy/local/stack does).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ingest') THEN
        CREATE ROLE ingest NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'analyst') THEN
        CREATE ROLE analyst NOLOGIN;
    END IF;
END
$$;

-- Only the two roles (and the owner) may connect; the service may keep a session-private
-- temporary staging table for redelivered batches.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO ingest', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO analyst', current_database());
END
$$;

-- ISA-95 levels discovered from topics: site, area, line, cell, ... A device's asset is the
-- path of levels between the topic prefix and the device id.
CREATE TABLE telemetry.assets (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    path        text NOT NULL UNIQUE,
    parent_id   integer REFERENCES telemetry.assets (id),
    name        text NOT NULL,
    depth       smallint NOT NULL CHECK (depth >= 1),
    first_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE telemetry.devices (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    path        text NOT NULL UNIQUE,            -- topic after the prefix
    name        text NOT NULL,                   -- last topic level
    asset_id    integer REFERENCES telemetry.assets (id),
    first_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE telemetry.sensors (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   integer NOT NULL REFERENCES telemetry.devices (id),
    name        text NOT NULL,
    unit        text,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz,
    UNIQUE (device_id, name)
);

-- Narrow readings: one row per (sensor, time). The unique index is the only index; it serves
-- deduplication and per-sensor time-range queries alike.
CREATE TABLE telemetry.readings (
    time        timestamptz NOT NULL,
    sensor_id   integer NOT NULL,
    value       double precision NOT NULL,
    quality     smallint NOT NULL DEFAULT 0,
    CONSTRAINT readings_sensor_time_key UNIQUE (sensor_id, time)
);
SELECT create_hypertable('telemetry.readings', by_range('time', INTERVAL '1 day'),
                         create_default_indexes => false);

CREATE TABLE telemetry.dead_letters (
    received_at   timestamptz NOT NULL,
    topic         text NOT NULL,
    payload       bytea NOT NULL,
    reason        text NOT NULL,
    content_type  text
);
SELECT create_hypertable('telemetry.dead_letters', by_range('received_at', INTERVAL '7 days'));

CREATE VIEW telemetry.readings_v AS
SELECT r.time AS ts, d.path AS device, s.name AS sensor, r.value, r.quality
  FROM telemetry.readings r
  JOIN telemetry.sensors s ON s.id = r.sensor_id
  JOIN telemetry.devices d ON d.id = s.device_id;

CREATE VIEW telemetry.sensors_v AS
SELECT d.path AS device, s.name AS sensor, s.unit, a.path AS asset, s.first_seen, s.last_seen,
       s.id AS sensor_id
  FROM telemetry.sensors s
  JOIN telemetry.devices d ON d.id = s.device_id
  LEFT JOIN telemetry.assets a ON a.id = d.asset_id;

GRANT USAGE ON SCHEMA telemetry TO ingest, analyst;
GRANT SELECT, INSERT ON telemetry.assets, telemetry.devices, telemetry.sensors,
                        telemetry.readings, telemetry.dead_letters TO ingest;
GRANT UPDATE (unit, last_seen) ON telemetry.sensors TO ingest;
GRANT SELECT ON ALL TABLES IN SCHEMA telemetry TO analyst;
