-- Asset health: per device, a PCA model of its sensors taken together (Hotelling's T² and the
-- residual Q, or SPE), fitted by `ingest baseline` from a healthy period, and the scoring state
-- that every ingester shares. Events are rows of telemetry.anomalies of kind 'asset', on the
-- device's pseudo-sensor '(asset)' (a name no device can publish), so that anomalies_v and
-- the alert rules see them like any other kind.

-- Every kind of event, the asset kind included.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT con.conname FROM pg_constraint con
         WHERE con.conrelid = 'telemetry.anomalies'::regclass AND con.contype = 'c'
           AND pg_get_constraintdef(con.oid) LIKE '%kind%'
    LOOP
        EXECUTE format('ALTER TABLE telemetry.anomalies DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;
ALTER TABLE telemetry.anomalies ADD CONSTRAINT anomalies_kind_check
    CHECK (kind IN ('range', 'rate', 'spike', 'drift', 'flatline', 'auto', 'asset'));

-- One model per device; `version` grows with every fit. The ingesters read it in the flush
-- that scores the device, so every instance scores with the same model.
CREATE TABLE telemetry.asset_models (
    device_id     integer PRIMARY KEY REFERENCES telemetry.devices (id),
    version       bigint NOT NULL DEFAULT 1,
    anchor_id     integer NOT NULL REFERENCES telemetry.sensors (id),  -- '(asset)'
    sensor_ids    integer[] NOT NULL,          -- the model's sensors, ascending ids
    sensors       text[] NOT NULL,             -- their names, in the same order
    mean          double precision[] NOT NULL, -- per sensor, over the baseline
    scale         double precision[] NOT NULL, -- per sensor: standard deviation (floored)
    components    integer NOT NULL,            -- k principal components kept
    loadings      double precision[] NOT NULL, -- d x k, row-major (sensor-major)
    eigenvalues   double precision[] NOT NULL, -- k variances of the kept components
    t2_limit      double precision NOT NULL,
    q_limit       double precision NOT NULL,
    fitted_from   timestamptz NOT NULL,
    fitted_to     timestamptz NOT NULL,
    samples       bigint NOT NULL,             -- device timestamps the fit used
    quantile      double precision NOT NULL,
    margin        double precision NOT NULL,
    fitted_at     timestamptz NOT NULL DEFAULT now()
);

-- The scoring state of each device with a model and an asset rule: the carried-forward last
-- value of each model sensor and the run of offending timestamps (an open event). A flush
-- locks the rows of its devices (FOR UPDATE, in device id order, after the per-sensor rows),
-- scores from this state and writes it back with version + 1 in its own transaction.
CREATE TABLE telemetry.asset_state (
    device_id      integer PRIMARY KEY REFERENCES telemetry.devices (id),
    version        bigint NOT NULL DEFAULT 0,
    model_version  bigint NOT NULL DEFAULT 0,
    last_time      timestamptz,                -- the newest device timestamp scored; NULL: none
    sensor_ids     integer[] NOT NULL DEFAULT '{}',
    ints           bigint[] NOT NULL DEFAULT '{}',  -- ingest.asset.kernel's state layout
    floats         double precision[] NOT NULL DEFAULT '{}'
) WITH (fillfactor = 50);

GRANT SELECT ON telemetry.asset_models TO ingest;
GRANT SELECT, INSERT ON telemetry.asset_state TO ingest;
GRANT UPDATE (version, model_version, last_time, sensor_ids, ints, floats)
    ON telemetry.asset_state TO ingest;

CREATE VIEW telemetry.asset_models_v AS
SELECT d.path AS device, m.version, m.sensors, m.components, m.t2_limit, m.q_limit,
       m.fitted_from, m.fitted_to, m.samples, m.quantile, m.margin, m.fitted_at,
       st.last_time AS scored_to
  FROM telemetry.asset_models m
  JOIN telemetry.devices d ON d.id = m.device_id
  LEFT JOIN telemetry.asset_state st ON st.device_id = m.device_id;

GRANT SELECT ON telemetry.asset_models, telemetry.asset_state, telemetry.asset_models_v
    TO analyst;
