-- Sparkplug B: the seq numbers of each edge node, merged from every ingester of a share group,
-- so that a lost message is counted once (ingest/sparkplug/seq.py). One row per edge node,
-- changed by one transaction per flush that holds the node's messages, locked in node order.
-- Positions count the messages of a sequence from its start (a message's seq is its position
-- modulo 256).

CREATE TABLE telemetry.sparkplug_seq (
    node        text PRIMARY KEY,                -- <group>/<edge node>
    next        bigint,                          -- the first position not settled; NULL before any
    last_pos    bigint,                          -- the last settled position whose message came
    last_ms     bigint,                          -- and that message's payload timestamp
    session_ms  bigint,                          -- timestamp of the NBIRTH the sequence began at
    in_gap      boolean NOT NULL DEFAULT false,  -- the last position settled was missing
    tentative_until float8,                      -- begun without an NBIRTH: settles from then (s)
    pending     jsonb NOT NULL DEFAULT '[]'      -- [position, ms, merged at (s)] from next on
);

GRANT SELECT, INSERT, UPDATE ON telemetry.sparkplug_seq TO ingest;
GRANT SELECT ON telemetry.sparkplug_seq TO analyst;
