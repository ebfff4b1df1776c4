-- Alerts: asset metadata (a small CMDB), one alert per (device, condition) with its lifecycle,
-- and the transactional outbox of their notifications.

-- Metadata per asset path (a level of the tree) or device path, set by `ingest assets import`.
-- Keyed by path rather than by id, so that metadata may be imported before the device is first
-- seen. A device takes each field from the longest matching path: its own, then its assets'.
CREATE TABLE telemetry.asset_meta (
    path         text PRIMARY KEY,
    type         text,
    criticality  smallint CHECK (criticality BETWEEN 1 AND 5),
    team         text,
    description  text,
    ci_id        text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- For each device path, the metadata that applies to it: per field, the value of the longest
-- path (the device's own, then its nearest asset) that sets it. Criticality defaults to 3.
CREATE VIEW telemetry.device_meta_v AS
SELECT d.id AS device_id, d.path AS device, a.path AS asset,
       (SELECT m.type FROM telemetry.asset_meta m
         WHERE m.type IS NOT NULL AND (d.path = m.path OR d.path LIKE m.path || '/%')
         ORDER BY length(m.path) DESC LIMIT 1) AS asset_type,
       coalesce((SELECT m.criticality FROM telemetry.asset_meta m
                  WHERE m.criticality IS NOT NULL AND (d.path = m.path OR d.path LIKE m.path || '/%')
                  ORDER BY length(m.path) DESC LIMIT 1), 3)::smallint AS criticality,
       (SELECT m.team FROM telemetry.asset_meta m
         WHERE m.team IS NOT NULL AND (d.path = m.path OR d.path LIKE m.path || '/%')
         ORDER BY length(m.path) DESC LIMIT 1) AS team,
       (SELECT m.description FROM telemetry.asset_meta m
         WHERE m.description IS NOT NULL AND (d.path = m.path OR d.path LIKE m.path || '/%')
         ORDER BY length(m.path) DESC LIMIT 1) AS description,
       (SELECT m.ci_id FROM telemetry.asset_meta m
         WHERE m.ci_id IS NOT NULL AND (d.path = m.path OR d.path LIKE m.path || '/%')
         ORDER BY length(m.path) DESC LIMIT 1) AS ci_id
  FROM telemetry.devices d
  LEFT JOIN telemetry.assets a ON a.id = d.asset_id;

-- A new version of sensors_v: the same columns, then the device's metadata.
CREATE OR REPLACE VIEW telemetry.sensors_v AS
SELECT d.path AS device, s.name AS sensor, s.unit, a.path AS asset, s.first_seen, s.last_seen,
       s.id AS sensor_id, m.asset_type, m.criticality, m.team, m.description, m.ci_id
  FROM telemetry.sensors s
  JOIN telemetry.devices d ON d.id = s.device_id
  LEFT JOIN telemetry.assets a ON a.id = d.asset_id
  LEFT JOIN telemetry.device_meta_v m ON m.device_id = d.id;

-- One row per (device, condition), created when the condition is first seen. Times named *_at
-- and since/clear_since/cursor are data times (the readings' clock); `phase` is the underlying
-- state, `flapping` damps notifications, `state` is what alerts_v shows. `version` grows with every change.
CREATE TABLE telemetry.alerts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key          text NOT NULL UNIQUE,             -- "<device path>:<condition>"
    device_id    integer NOT NULL REFERENCES telemetry.devices (id),
    condition    text NOT NULL,
    severity     text NOT NULL
                 CHECK (severity IN ('info', 'warning', 'minor', 'major', 'critical')),
    state        text NOT NULL
                 CHECK (state IN ('inactive', 'pending', 'open', 'flapping', 'resolved')),
    phase        text NOT NULL CHECK (phase IN ('inactive', 'pending', 'open', 'resolved')),
    flapping     boolean NOT NULL DEFAULT false,
    since        timestamptz,                      -- the current condition began
    clear_since  timestamptz,                      -- the condition went away while open
    opened_at    timestamptz,
    resolved_at  timestamptz,
    opens        timestamptz[] NOT NULL DEFAULT '{}',  -- recent openings, for flapping
    flap_since   timestamptz,                      -- last opening or resolve while flapping
    sensors      text[] NOT NULL DEFAULT '{}',     -- contributing sensors
    cursor       timestamptz,                      -- data time evaluated up to
    version      integer NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, condition)
);

-- One row per notification and sink, written in the transaction that changed the alert.
CREATE TABLE telemetry.alert_outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id      bigint NOT NULL REFERENCES telemetry.alerts (id),
    alert_key     text NOT NULL,
    sink          text NOT NULL,
    event         text NOT NULL CHECK (event IN ('opened', 'updated', 'flapping', 'resolved')),
    payload       jsonb NOT NULL,                  -- the alert as it was at the change
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt  timestamptz NOT NULL DEFAULT now(),
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz
);
CREATE INDEX alert_outbox_pending_idx ON telemetry.alert_outbox (sink, alert_key, id)
    WHERE status = 'pending';

CREATE VIEW telemetry.alerts_v AS
SELECT al.key, m.asset, m.device, al.condition, al.severity,
       (CASE al.severity WHEN 'critical' THEN 5 WHEN 'major' THEN 4 WHEN 'minor' THEN 3
                         WHEN 'warning' THEN 2 ELSE 1 END) * m.criticality AS priority,
       al.state, al.since, al.opened_at, al.resolved_at, al.sensors, m.criticality, m.asset_type,
       m.team, m.ci_id, al.updated_at
  FROM telemetry.alerts al
  JOIN telemetry.device_meta_v m ON m.device_id = al.device_id;

CREATE VIEW telemetry.alert_deliveries_v AS
SELECT o.id, o.alert_key, o.sink, o.event, o.status, o.attempts, o.last_error, o.created_at,
       o.next_attempt, o.delivered_at
  FROM telemetry.alert_outbox o;

GRANT SELECT ON telemetry.asset_meta TO ingest;
GRANT SELECT, INSERT ON telemetry.alerts, telemetry.alert_outbox TO ingest;
GRANT UPDATE (severity, state, phase, flapping, since, clear_since, opened_at, resolved_at, opens, flap_since,
              sensors, cursor, version, updated_at) ON telemetry.alerts TO ingest;
GRANT UPDATE (status, attempts, next_attempt, last_error, delivered_at)
    ON telemetry.alert_outbox TO ingest;
GRANT SELECT ON telemetry.device_meta_v, telemetry.sensors_v TO ingest;
GRANT SELECT ON telemetry.asset_meta, telemetry.alerts, telemetry.alert_outbox,
                telemetry.device_meta_v, telemetry.sensors_v, telemetry.alerts_v,
                telemetry.alert_deliveries_v TO analyst;
