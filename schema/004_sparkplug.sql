-- Sparkplug B: what the last births of each edge node defined, shared by every ingester.
--
-- A BIRTH's rows are written in the transaction that writes its readings. `birth_id` changes
-- with every NBIRTH or DBIRTH of the node; an ingester compares it with the one its cache was
-- built from (one query per flush for the nodes the flush touches) and reloads on a change.

CREATE TABLE telemetry.sparkplug_nodes (
    node        text PRIMARY KEY,                -- <group>/<edge node>
    birth_id    bigint NOT NULL,                 -- changes with every birth of the node
    bd_seq      bigint,                          -- bdSeq of the last NBIRTH (NDEATH must match)
    born_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per metric of the node's last NBIRTH and its devices' last DBIRTHs.
CREATE TABLE telemetry.sparkplug_metrics (
    node        text NOT NULL REFERENCES telemetry.sparkplug_nodes (node),
    device      text NOT NULL,                   -- '' for the node's own metrics
    name        text NOT NULL,                   -- the sensor name (templates: instance/member)
    alias       bigint,                          -- the alias's 64 bits; NULL without one
    sensor_id   integer,                         -- NULL for metrics not stored (strings, ...)
    datatype    smallint NOT NULL,
    PRIMARY KEY (node, device, name)
);
CREATE INDEX sparkplug_metrics_alias ON telemetry.sparkplug_metrics (node, alias);

GRANT SELECT, INSERT, UPDATE, DELETE ON telemetry.sparkplug_nodes, telemetry.sparkplug_metrics
    TO ingest;
GRANT SELECT ON telemetry.sparkplug_nodes, telemetry.sparkplug_metrics TO analyst;
