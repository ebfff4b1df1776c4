-- The version of each sensor's anomaly state, so that several ingesters judge a sensor's
-- readings as one would. A flush locks the rows of the sensors with an anomaly rule that it
-- touches (FOR UPDATE, in sensor id order), checks its cached state against `version`, and
-- writes the new version in its own transaction. Sensors without a rule have no row.

CREATE TABLE telemetry.anomaly_state (
    sensor_id     integer PRIMARY KEY REFERENCES telemetry.sensors (id),
    -- Grows by one with every committed flush that brings the sensor new finite readings.
    version       bigint NOT NULL DEFAULT 0,
    -- The newest reading the filters have taken in; NULL: none yet.
    last_time     timestamptz,
    -- The oldest finite reading stored for the sensor ('-infinity': not known); NULL: none yet.
    first_time    timestamptz,
    -- Where the readings the state is rebuilt from are expected to begin (an estimate: a
    -- restore reads further back when it must); NULL: not known.
    history_from  timestamptz,
    -- The earliest start of the events open at last_time ('-infinity': not known); NULL: none.
    events_from   timestamptz,
    -- The last version that stored readings older than the newest before it: a cached state of
    -- an older version cannot be brought up to date by reading only what followed it.
    rebased       bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);  -- room for HOT updates: one per sensor and flush

GRANT SELECT, INSERT ON telemetry.anomaly_state TO ingest;
GRANT UPDATE (version, last_time, first_time, history_from, events_from, rebased)
    ON telemetry.anomaly_state TO ingest;
-- A late batch replaces the events of the span it was merged into.
GRANT DELETE ON telemetry.anomalies TO ingest;
GRANT SELECT ON telemetry.anomaly_state TO analyst;
